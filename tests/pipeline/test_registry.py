"""register_and_promote on real exports of tiny models and a real MLflow sqlite registry (no mocks)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow_fixtures import RESULTS, Params, fresh_store, make_exports

from moai_lib.pipeline.errors import PipelineError
from moai_lib.pipeline.registry import (
    RegisterParams,
    artifact_sha256,
    choose_champion,
    register_and_promote,
)
from moai_lib.pipeline.tracking import TrackingParams


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir, sample_tokenizer_dir) -> Path:
    """A run root with three exported variants (rtn really INT4-quantized) and reports/comparison.csv."""
    return make_exports(tmp_path_factory.mktemp("exports_root"), tiny_model_dir, sample_tokenizer_dir)


@pytest.fixture
def run_dir(exported, tmp_path, tmp_path_factory, monkeypatch) -> Path:
    """A copy of the exported run root with its own template-copied store (each test starts empty)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MOAI_PIPELINE_ID", raising=False)
    root = tmp_path / "run"
    shutil.copytree(exported, root)
    fresh_store(tmp_path_factory, root)
    return root


def client_for(root: Path) -> MlflowClient:
    uri = f"sqlite:///{root / 'mlruns.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


TRACKING = TrackingParams(experiment="moai-test")


def test_register_promote_idempotent_and_loadable(run_dir):
    import mlflow.pyfunc

    params = Params(run_dir, RegisterParams(model_name="tiny-moai"), TRACKING)
    first = register_and_promote(params)
    assert first["champion"] == "rtn"
    assert sorted(first["registered"]) == ["bf16", "qat", "rtn"] and first["skipped"] == []
    client = client_for(run_dir)
    versions = client.search_model_versions("name = 'tiny-moai'")
    assert len(versions) == 3
    champion = client.get_model_version_by_alias("tiny-moai", "champion")
    assert int(champion.version) == first["version"] == first["versions"]["rtn"]
    assert champion.tags["variant"] == "rtn" and champion.tags["method"] == "rtn"
    assert champion.tags["artifact_sha256"] == artifact_sha256(run_dir / "outputs" / "exports" / "rtn")
    assert float(champion.tags["metric.ppl"]) == 10.4
    # The registration ran as a stage run under the pipeline's parent.
    run = client.get_run(champion.run_id)
    assert run.data.tags["moai.stage"] == "register" and "mlflow.parentRunId" in run.data.tags

    # Re-running registers nothing new.
    second = register_and_promote(params)
    assert second["registered"] == [] and sorted(second["skipped"]) == ["bf16", "qat", "rtn"]
    assert second["versions"] == first["versions"] and second["version"] == first["version"]
    assert len(client.search_model_versions("name = 'tiny-moai'")) == 3

    # A stricter rule moves the alias without new versions: qat is the smallest within 3 %.
    strict = register_and_promote(Params(run_dir, RegisterParams(model_name="tiny-moai", max_ppl_increase_pct=3),
                                         TRACKING))
    assert strict["champion"] == "qat" and strict["registered"] == []
    assert int(client.get_model_version_by_alias("tiny-moai", "champion").version) == first["versions"]["qat"]

    # The champion (a real INT4 model) loads as a pyfunc and generates text for a prompt column.
    with mlflow_uri(run_dir):
        model = mlflow.pyfunc.load_model(f"models:/tiny-moai/{first['versions']['rtn']}")
    out = model.predict(pd.DataFrame({"prompt": ["Hello world", "안녕하세요"]}), params={"max_new_tokens": 4})
    assert list(out.columns) == ["completion"] and len(out) == 2
    assert all(isinstance(t, str) for t in out["completion"])
    assert model.metadata.get_params_schema() is not None


def mlflow_uri(root: Path):
    from moai_lib.pipeline.registry import _fluent_uri

    return _fluent_uri(f"sqlite:///{root / 'mlruns.db'}")


def test_changed_export_gets_a_new_version_only_for_itself(run_dir):
    params = Params(run_dir, RegisterParams(model_name="tiny-moai"), TRACKING, variants=("bf16", "rtn"))
    first = register_and_promote(params)
    weights = next((run_dir / "outputs" / "exports" / "bf16").glob("*.safetensors"))
    (run_dir / "outputs" / "exports" / "bf16" / "README.md").write_text("a new card only")
    assert register_and_promote(params)["registered"] == []  # the card is not part of the artifact hash
    weights.write_bytes(weights.read_bytes() + b" ")  # different bytes: a different artifact
    again = register_and_promote(params)
    assert again["registered"] == ["bf16"] and again["skipped"] == ["rtn"]
    assert again["versions"]["bf16"] > first["versions"]["bf16"]


def test_champion_rule():
    rows = {r["variant"]: r for r in RESULTS}
    rule = RegisterParams()
    assert choose_champion(rows, ["bf16", "qat", "rtn"], rule) == "rtn"
    assert choose_champion(rows, ["bf16", "qat"], rule) == "qat"
    assert choose_champion(rows, ["bf16", "qat", "rtn"], RegisterParams(max_ppl_increase_pct=0)) == "bf16"
    with pytest.raises(PipelineError, match=r"^register\.max_ppl_increase_pct: no exported variant .* rtn, is 4\.00%"):
        choose_champion(rows, ["rtn"], RegisterParams(max_ppl_increase_pct=1))
    with pytest.raises(PipelineError, match=r"^register\.baseline"):
        choose_champion({"rtn": rows["rtn"]}, ["rtn"], rule)
    with pytest.raises(PipelineError, match=r"^register\.colour: unknown key"):
        RegisterParams.from_dict({"colour": "red"})
    with pytest.raises(PipelineError, match=r"^register\.max_ppl_increase_pct"):
        RegisterParams(max_ppl_increase_pct=-1)


def test_no_exports_or_table_is_a_clear_error(tmp_path):
    params = Params(tmp_path, RegisterParams(), TrackingParams(enabled=False))
    with pytest.raises(PipelineError, match="run the export stage"):
        register_and_promote(params)
