"""The stages end to end on the tiny profile (in-process), and crash safety: a stage that fails mid-way leaves
the previous outputs as they were and nothing half-written; running it again completes it."""

from __future__ import annotations

import json
import shutil

import pytest
from pipeline_helpers import make_root, tree_state

from moai_lib.pipeline import PipelineParams
from moai_lib.pipeline.stages import run_stage


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A tiny run root after every stage."""
    root = make_root(tmp_path_factory.mktemp("tiny_run"))
    params = PipelineParams.load(root / "params.yaml")
    results = {"tokenize": run_stage("tokenize", params), "pretrain": run_stage("pretrain", params),
               "qat": run_stage("qat", params)}
    for method in params.quantize.methods:
        results[f"quantize_{method}"] = run_stage("quantize", params, method=method)
    for variant in params.variants():
        results[f"evaluate_{variant}"] = run_stage("evaluate", params, variant=variant)
    results["report"] = run_stage("report", params)
    results["export"] = run_stage("export", params)
    return params, results


def test_outputs_and_metrics(done):
    params, results = done
    root = params.root
    for name, metrics in results.items():
        on_disk = json.loads((root / "metrics" / f"{name}.json").read_text())
        assert on_disk == json.loads(json.dumps(metrics)), name
    pre = results["pretrain"]
    assert pre["completed"] and pre["step"] == 8 and pre["val_ppl"] > 1 and pre["valid_unigram_ppl"] > 1
    assert pre["val_ppl_vs_unigram"] == pytest.approx(pre["val_ppl"] / pre["valid_unigram_ppl"])
    for variant in params.variants():
        model_dir = params.path("model", variant=variant)
        assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
        assert list(model_dir.glob("*.safetensors"))
        ev = json.loads(params.path("eval", variant=variant).read_text())
        assert ev["variant"] == variant and ev["ppl"] > 1
        assert (params.path("export", variant=variant) / "README.md").is_file()
    # stored quantized: the qat model's and the int4 model's linear layers are packed 4-bit
    for variant in ("qat", "int4", "gptq"):
        config = json.loads((params.path("model", variant=variant) / "config.json").read_text())
        layouts = config["quantization_config"]["modules"]
        assert layouts and all(v["bits"] == 4 and v["group_size"] == 32 for v in layouts.values()), variant
        assert results[f"evaluate_{variant}"]["bits_per_weight"] < 8
    assert results["quantize_gptq"]["calibration_sequences"] == 8
    table = (params.path("reports") / "comparison.md").read_text()
    assert all(f"| {v} |" in table for v in params.variants())
    assert set(results["report"]) >= set(params.variants())
    # nothing temporary left behind
    assert not [p for p in root.rglob(".*tmp-*")]


def test_quantize_failure_leaves_previous_output(done, monkeypatch):
    params, _ = done
    target = params.path("quantized_model", method="int4")
    metrics_file = params.path("metrics", name="quantize_int4")
    before, metrics_before = tree_state(target), metrics_file.read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("injected failure after the weights were written")

    monkeypatch.setattr("moai_lib.pipeline.stages._copy_tokenizer", crash)
    with pytest.raises(RuntimeError, match="injected"):
        run_stage("quantize", params, method="int4")
    assert tree_state(target) == before and metrics_file.read_bytes() == metrics_before
    assert not list(target.parent.glob(".int4.tmp-*"))
    monkeypatch.undo()
    metrics = run_stage("quantize", params, method="int4")
    assert metrics["bits_per_weight"] < 8 and tree_state(target) != before


def test_pretrain_failure_then_resume(done, monkeypatch):
    """Training dies before its final save: the old model and metrics stay; the re-run resumes from the last
    checkpoint of the same run instead of starting over. A changed param starts over."""
    params, _ = done
    target = params.path("pretrain_model")
    metrics_file = params.path("metrics", name="pretrain")
    before, metrics_before = tree_state(target), metrics_file.read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("injected crash while saving the final model")

    monkeypatch.setattr("moai_lib.train.loop._save_final_model", crash)
    with pytest.raises(RuntimeError, match="injected"):
        run_stage("pretrain", params)
    assert tree_state(target) == before and metrics_file.read_bytes() == metrics_before
    monkeypatch.undo()
    resumed = run_stage("pretrain", params)
    assert resumed["completed"] and resumed["resumed_from_step"] == 8
    changed = run_stage("pretrain", PipelineParams.load(params.root / "params.yaml",
                                                        overrides=["pretrain.learning_rate=1e-3"]))
    assert changed["completed"] and changed["resumed_from_step"] is None and changed["step"] == 8


def test_failed_export_then_rerun_registers_each_variant_once(done, tmp_path_factory, monkeypatch):
    """Export dies half-way (one variant exported, the next one failing): what is in place is complete (each
    variant is written to a temp dir and renamed), nothing temporary is left; the re-run completes, and
    promotion registers exactly one version per variant, also when run twice."""
    from mlflow import MlflowClient
    from mlflow_fixtures import fresh_store

    from moai_lib.pipeline.registry import register_and_promote

    params, _ = done
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MOAI_PIPELINE_ID", raising=False)
    exports = params.path("export", variant="bf16").parent
    shutil.rmtree(exports)
    calls = []
    real = __import__("moai_lib.pipeline.export", fromlist=["export_model"]).export_model

    def dies_on_second(*args, **kwargs):
        calls.append(kwargs.get("variant"))
        if len(calls) == 2:
            raise RuntimeError("injected failure in the middle of the export")
        return real(*args, **kwargs)

    monkeypatch.setattr("moai_lib.pipeline.export.export_model", dies_on_second)
    with pytest.raises(RuntimeError, match="injected"):
        run_stage("export", params)
    left = sorted(p.name for p in exports.iterdir())
    assert left == [calls[0]], left  # the first variant complete, no temp dir of the second
    assert (exports / calls[0] / "README.md").is_file() and (exports / calls[0] / "config.json").is_file()
    monkeypatch.undo()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MOAI_PIPELINE_ID", raising=False)
    run_stage("export", params)
    uri = fresh_store(tmp_path_factory, params.root)
    tracked = PipelineParams.load(params.root / "params.yaml", overrides=["tracking.enabled=true"])
    first = register_and_promote(tracked)
    second = register_and_promote(tracked)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{first['model_name']}'")
    assert sorted(v.tags["variant"] for v in versions) == sorted(params.variants())
    assert second["registered"] == [] and first["champion"] == second["champion"]
    assert client.get_model_version_by_alias(first["model_name"], "champion").tags["variant"] == first["champion"]
