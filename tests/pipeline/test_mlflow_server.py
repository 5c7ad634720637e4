"""A real `mlflow server` on loopback: a stage run and a model registration go through its REST API.

The server is started once for the module in its own process group (it spawns a uvicorn worker) and the group
is killed afterwards. It takes ~35-60 s to answer /health on the shared 2-core machine, so the exports are
built while it starts.
"""

from __future__ import annotations

import shutil
import time

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow_fixtures import Params, make_exports, start_mlflow_server, stop_process_group, template_db, wait_healthy

from moai_lib.pipeline.registry import RegisterParams, _fluent_uri, register_and_promote
from moai_lib.pipeline.tracking import TrackingParams, stage_run


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, sample_tokenizer_dir):
    """(server URL, a run root with bf16 and rtn exports and reports/comparison.csv, the server process)."""
    base = tmp_path_factory.mktemp("mlflow_server")
    db = base / "server.db"
    shutil.copyfile(template_db(tmp_path_factory), db)  # no schema migration at server start
    proc, url = start_mlflow_server(f"sqlite:///{db}", base / "artifacts", base / "server.log")
    try:
        root = make_exports(base / "run", tiny_model_dir, sample_tokenizer_dir, variants=("bf16", "rtn"))
        (root / "params.yaml").write_text("pretrain:\n  max_steps: 3\n")
        wait_healthy(proc, url)
        yield url, root, proc
    finally:
        stop_process_group(proc)


def test_stage_run_and_registration_through_a_server(server, monkeypatch):
    url, root, _ = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # honoured by the default tracking_uri: None
    monkeypatch.delenv("MOAI_PIPELINE_ID", raising=False)
    settings = TrackingParams(experiment="moai-server")

    with stage_run("pretrain", {"pretrain": {"max_steps": 3}}, settings=settings, root=root) as run:
        run.log_metrics({"val_ppl": 42.0, "train_tokens": 1234})
        run.log_artifact(root / "reports" / "comparison.csv")
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.metrics == {"val_ppl": 42.0, "train_tokens": 1234.0}
    assert logged.data.params == {"pretrain.max_steps": "3"}
    parent = client.get_run(logged.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["moai.role"] == "pipeline" and parent.data.metrics == {}
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["comparison.csv"]

    result = register_and_promote(Params(root, RegisterParams(model_name="moai-server"), settings,
                                         variants=("bf16", "rtn")))
    assert result["champion"] == "rtn" and sorted(result["registered"]) == ["bf16", "rtn"]
    again = register_and_promote(Params(root, RegisterParams(model_name="moai-server"), settings,
                                        variants=("bf16", "rtn")))
    assert again["registered"] == [] and again["version"] == result["version"]
    assert len(client.search_model_versions("name = 'moai-server'")) == 2
    # Both stage runs share the parent of this pipeline execution (same git commit + params.yaml).
    register_run = client.get_run(client.get_model_version_by_alias("moai-server", "champion").run_id)
    assert register_run.data.tags["mlflow.parentRunId"] == parent.info.run_id

    import mlflow.pyfunc

    with _fluent_uri(url):  # the weights come back through the server's artifact proxy
        model = mlflow.pyfunc.load_model("models:/moai-server@champion")
    out = model.predict(pd.DataFrame({"prompt": ["The"]}), params={"max_new_tokens": 3})
    assert isinstance(out["completion"][0], str)


def test_server_dying_during_a_stage_spools_without_stopping_it(server, monkeypatch, caplog):
    """Runs last in this module: it stops the server."""
    url, root, proc = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    with stage_run("qat", {"qat": {"bits": 4}}, settings=TrackingParams(experiment="moai-server", timeout_s=3),
                   root=root) as run:
        stop_process_group(proc)  # the server dies during a long training run
        start = time.monotonic()
        run.log_metrics({"val_ppl": 40.0})
        elapsed = time.monotonic() - start
        result = "trained"
    assert result == "trained"
    assert elapsed < 30  # MLflow's default retries would take minutes
    spooled = (root / ".mlflow-spool" / f"{run.run_id}.jsonl").read_text().splitlines()
    assert len(spooled) == 2 and '"val_ppl"' in spooled[0] and '"end"' in spooled[1]
