"""stage_run against a real MLflow sqlite store: parent + nested runs, tags, metrics once, failures."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_fixtures import free_port, make_run_root

from moai_lib.pipeline import tracking
from moai_lib.pipeline.errors import PipelineError
from moai_lib.pipeline.tracking import (
    TrackingParams,
    TrackingUnavailableError,
    resolve_pipeline_id,
    stage_run,
)

ON = TrackingParams(experiment="moai-test")


@pytest.fixture
def run_root(tmp_path_factory, tmp_path, monkeypatch):
    return make_run_root(tmp_path_factory, tmp_path, monkeypatch)


def client_for(root) -> MlflowClient:
    uri = f"sqlite:///{root / 'mlruns.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs(root, role: str):
    client = client_for(root)
    exp = client.get_experiment_by_name(ON.experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`moai.role` = '{role}'")


def test_params_validation_names_the_key():
    with pytest.raises(PipelineError, match=r"^tracking\.bogus: unknown key"):
        TrackingParams.from_dict({"bogus": 1})
    with pytest.raises(PipelineError, match=r"^tracking\.on_failure: must be one of fail, warn"):
        TrackingParams.from_dict({"on_failure": "ignore"})
    with pytest.raises(PipelineError, match=r"^tracking\.timeout_s"):
        TrackingParams.from_dict({"timeout_s": 0})
    with pytest.raises(PipelineError, match=r"^tracking\.enabled"):
        TrackingParams.from_dict({"enabled": "yes"})
    assert TrackingParams.from_dict(None) == TrackingParams()


def test_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert TrackingParams().resolve_uri(tmp_path) == (f"sqlite:///{tmp_path.resolve()}/mlruns.db", "default")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert TrackingParams().resolve_uri(tmp_path) == ("http://127.0.0.1:5999", "MLFLOW_TRACKING_URI")
    explicit = TrackingParams(tracking_uri="sqlite:///x.db")
    assert explicit.resolve_uri(tmp_path) == ("sqlite:///x.db", "tracking.tracking_uri")


def test_parent_and_nested_stage_runs(run_root, monkeypatch):
    subprocess.run(["git", "init", "-q"], cwd=run_root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=run_root, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=run_root, capture_output=True, text=True).stdout.strip()

    monkeypatch.setenv("DVC_STAGE", "tokenize")
    with stage_run("tokenize", {"tokenize": {"vocab_size": 512, "corpus": ["a", "b"]}}, settings=ON,
                   root=run_root) as run:
        run.log_metrics({"tokens": 1000, "language": "en", "nested": {"x": 1.5}})
    monkeypatch.setenv("DVC_STAGE", "quantize@gptq")
    with stage_run("quantize@gptq", {"quantize": {"group_size": 64}}, settings=ON, root=run_root,
                   tags={"metaflow_run_id": "MoaiFlow/17"}) as run2:
        run2.log_metrics({"size_mb": 1.25})

    (parent,) = runs(run_root, "pipeline")
    stages = {r.data.tags["moai.stage"]: r for r in runs(run_root, "stage")}
    assert set(stages) == {"tokenize", "quantize@gptq"}
    pid = resolve_pipeline_id(run_root)
    assert pid.startswith(f"git-{commit[:12]}-params-")
    assert parent.data.tags["moai.pipeline_id"] == pid
    assert parent.data.tags["moai.git_commit"] == commit
    assert parent.data.metrics == {}  # metrics live on the stage runs only
    assert parent.info.status == "FINISHED"

    tok, quant = stages["tokenize"], stages["quantize@gptq"]
    for r in (tok, quant):
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["moai.pipeline_id"] == pid
        assert r.data.tags["moai.git_commit"] == r.data.tags["mlflow.source.git.commit"] == commit
        assert r.info.status == "FINISHED"
    assert tok.data.params == {"tokenize.vocab_size": "512", "tokenize.corpus": '["a", "b"]'}
    assert tok.data.metrics == {"tokens": 1000.0, "nested.x": 1.5}
    assert tok.data.tags["language"] == "en"  # strings become tags
    assert tok.data.tags["moai.dvc_stage"] == "tokenize"
    assert quant.data.tags["moai.dvc_stage"] == "quantize@gptq"
    assert quant.data.tags["moai.stage_kind"] == "quantize"
    assert quant.data.tags["moai.metaflow_run_id"] == "MoaiFlow/17"
    assert quant.info.run_name == "quantize@gptq"


def test_each_metric_logged_once(run_root, caplog):
    with stage_run("evaluate@bf16", {}, settings=ON, root=run_root) as run:
        run.log_metrics({"ppl": 10.0})
        with caplog.at_level(logging.WARNING, logger="moai_lib.pipeline.tracking"):
            run.log_metrics({"ppl": 11.0, "decode_tok_s": 5})
        run.log_metrics({"loss": 3.0}, step=1)
        run.log_metrics({"loss": 2.0}, step=2)  # a history with steps is allowed
    assert "already logged" in caplog.text
    history = client_for(run_root).get_metric_history(run.run_id, "ppl")
    assert [m.value for m in history] == [10.0]
    assert [m.value for m in client_for(run_root).get_metric_history(run.run_id, "loss")] == [3.0, 2.0]


def test_failed_stage_is_marked_failed_and_reraises(run_root):
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run("pretrain", {"lr": 1}, settings=ON, root=run_root):
            raise RuntimeError("boom")
    (run,) = runs(run_root, "stage")
    assert run.info.status == "FAILED"
    assert run.data.tags["moai.error"] == "RuntimeError: boom"
    (parent,) = runs(run_root, "pipeline")
    assert parent.info.status == "FAILED"
    # The repaired re-run (same stage, same params) continues the same run, under the same parent; both are
    # FINISHED again.
    with stage_run("pretrain", {"lr": 1}, settings=ON, root=run_root) as rerun:
        rerun.log_metrics({"val_ppl": 3.0})
    (parent2,) = runs(run_root, "pipeline")
    assert parent2.info.run_id == parent.info.run_id == rerun.parent_run_id
    assert parent2.info.status == "FINISHED"
    (resumed,) = runs(run_root, "stage")
    assert resumed.info.run_id == run.info.run_id == rerun.run_id
    assert resumed.info.status == "FINISHED" and resumed.data.tags["moai.resumed"] == "1"
    assert "moai.error" not in resumed.data.tags and resumed.data.metrics["val_ppl"] == 3.0
    # With other params it is another run.
    with stage_run("pretrain", {"lr": 2}, settings=ON, root=run_root) as other:
        pass
    assert other.run_id != run.info.run_id and len(runs(run_root, "stage")) == 2


def test_pipeline_id_rule(run_root, monkeypatch):
    with stage_run("tokenize", {}, settings=ON, root=run_root) as a:
        pass
    (run_root / "params.yaml").write_text("pretrain:\n  learning_rate: 0.002\n")  # e.g. dvc exp run -S ...
    with stage_run("tokenize", {}, settings=ON, root=run_root) as b:
        pass
    monkeypatch.setenv("MOAI_PIPELINE_ID", "driver-42")
    with stage_run("tokenize", {}, settings=ON, root=run_root) as c:
        pass
    with stage_run("pretrain", {}, settings=ON, root=run_root, pipeline_id="MoaiFlow/9") as d:
        pass
    assert len({a.parent_run_id, b.parent_run_id, c.parent_run_id, d.parent_run_id}) == 4
    assert (c.pipeline_id, d.pipeline_id) == ("driver-42", "MoaiFlow/9")
    assert len(runs(run_root, "pipeline")) == 4


def test_disabled_is_a_noop(tmp_path):
    with stage_run("pretrain", {"a": 1}, settings=TrackingParams(enabled=False), root=tmp_path) as run:
        run.log_metrics({"x": 1})
        run.log_artifact(tmp_path)
    assert run.run_id is None
    assert not (tmp_path / "mlruns.db").exists()


def test_unreachable_server_fails_fast_before_the_work(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    worked = []
    start = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as info:
        with stage_run("pretrain", {}, settings=TrackingParams(timeout_s=2), root=tmp_path):
            worked.append(True)
    assert time.monotonic() - start < 10  # MLflow's own retries would take minutes
    assert not worked
    message = str(info.value)
    assert "MLFLOW_TRACKING_URI" in message and "unreachable" in message and "mlflow server" in message
    # on_failure: warn runs the stage untracked instead.
    with stage_run("pretrain", {}, settings=TrackingParams(timeout_s=2, on_failure="warn"), root=tmp_path) as run:
        worked.append(True)
    assert worked == [True] and run.run_id is None


def test_store_failure_during_the_stage_keeps_the_work_and_flushes_later(run_root, caplog):
    db = run_root / "mlruns.db"
    with stage_run("pretrain", {}, settings=ON, root=run_root) as run:
        healthy = db.read_bytes()  # with the run created
        db.write_bytes(b"not a database" * 100)  # the store breaks while the stage works
        with caplog.at_level(logging.WARNING, logger="moai_lib.pipeline.tracking"):
            run.log_metrics({"loss": 1.0, "note": "spooled"})
        result = "trained"
    assert result == "trained"
    assert "the stage continues" in caplog.text
    spool = run_root / ".mlflow-spool" / f"{run.run_id}.jsonl"
    assert len(spool.read_text().splitlines()) == 2  # the metrics and the run's end

    db.write_bytes(healthy)  # the store is back: the next stage sends the spooled records first
    with stage_run("evaluate@bf16", {}, settings=ON, root=run_root):
        pass
    assert not spool.exists()
    flushed = client_for(run_root).get_run(run.run_id)
    assert flushed.data.metrics == {"loss": 1.0} and flushed.data.tags["note"] == "spooled"
    assert flushed.info.status == "FINISHED"


# A stage process that imports only the tracking module: moai_lib's package __init__ (torch, transformers) is
# bypassed so the test costs the MLflow import only; what it checks is the MLflow side.
STAGE_PROCESS = """
import sys, types
package = types.ModuleType("moai_lib")
package.__path__ = [sys.argv[3]]
sys.modules["moai_lib"] = package
from moai_lib.pipeline.tracking import TrackingParams, stage_run
with stage_run(sys.argv[2], {}, settings=TrackingParams(experiment="moai-test"), root=sys.argv[1]) as run:
    run.log_metrics({"x": 1})
print("PARENT", run.parent_run_id)
"""


def test_separate_stage_processes_share_one_parent(run_root):
    """Like `dvc repro` (one process per stage, started at once here to race on creating the parent): the
    derived pipeline id puts both stages under one parent run."""
    package_dir = str(Path(tracking.__file__).resolve().parents[1])
    procs = [subprocess.Popen([sys.executable, "-c", STAGE_PROCESS, str(run_root), stage, package_dir],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
             for stage in ("quantize@rtn", "quantize@gptq")]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    parents = {line.split()[1] for out, _ in outputs for line in out.splitlines() if line.startswith("PARENT")}
    assert len(parents) == 1
    (parent,) = runs(run_root, "pipeline")
    assert {parent.info.run_id} == parents
    assert len(runs(run_root, "stage")) == 2
