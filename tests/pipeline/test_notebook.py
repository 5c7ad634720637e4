"""Execute notebooks/quant_comparison.py (jupytext py:percent) with nbclient against a store filled by real
stage runs: the table, both plots and the champion must come out."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from mlflow_fixtures import RESULTS, make_run_root

from moai_lib.pipeline.tracking import TrackingParams, stage_run

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quant_comparison.py"


def outputs_of(nb) -> tuple[str, int]:
    """(all text output, number of PNG images) of an executed notebook."""
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            data = out.get("data", {})
            text.append(data.get("text/plain", "") + data.get("text/markdown", "") + data.get("text/html", ""))
            images += "image/png" in data
    return "\n".join(text), images


def test_notebook_shows_table_plots_and_champion(tmp_path_factory, tmp_path, monkeypatch):
    import jupytext
    from nbclient import NotebookClient

    root = make_run_root(tmp_path_factory, tmp_path, monkeypatch)
    uri = f"sqlite:///{root / 'mlruns.db'}"
    settings = TrackingParams(experiment="moai-nb")
    # An older pipeline execution whose numbers must not show up ...
    with stage_run("evaluate@bf16", {}, settings=settings, root=root, pipeline_id="old") as run:
        run.log_metrics({"ppl": 99.0, "size_mb": 9.0})
    # ... and the latest one: one evaluate run per variant, plus a stage that is not an evaluation.
    with stage_run("pretrain", {"pretrain": {"max_steps": 3}}, settings=settings, root=root, pipeline_id="new") as run:
        run.log_metrics({"val_ppl": 12.0})
    for result in RESULTS:
        with stage_run(f"evaluate@{result['variant']}", {"evaluate": {"batch_size": 2}}, settings=settings,
                       root=root, pipeline_id="new") as run:
            run.log_metrics({k: v for k, v in result.items() if k not in ("variant", "method")})
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("nb-model", tags={"moai.champion_rule": "smallest within 5%"})
    for result in RESULTS:
        version = client.create_model_version("nb-model", source=str(root), tags={
            "variant": result["variant"], "method": result["method"]})
        if result["variant"] == "rtn":
            client.set_registered_model_alias("nb-model", "champion", version.version)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MOAI_EXPERIMENT", "moai-nb")
    monkeypatch.setenv("MOAI_MODEL_NAME", "nb-model")
    nb = jupytext.read(NOTEBOOK)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()

    text, images = outputs_of(nb)
    assert images == 2  # perplexity vs size, speed per method
    assert "pipeline new" in text and "3 evaluation runs" in text
    for result in RESULTS:
        assert result["variant"] in text
    assert "10.4" in text and "99.0" not in text  # the latest pipeline only
    assert "champion: rtn (version 3)" in text

