"""`moai promote` with its MLflow artifacts in S3, against a real S3 server on loopback (moto's server): the
registered model version (pyfunc with the exported model as artifact) is written to the S3 artifact root and its
files come back from S3 through the model registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow_fixtures import Params, fresh_store, make_exports
from s3_helpers import bucket_keys, make_bucket

pytest.importorskip("boto3")
pytest.importorskip("moto")

from moai_lib.pipeline.tracking import TrackingParams  # noqa: E402


def _run_root(tmp_path_factory, tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MOAI_PIPELINE_ID", "DVC_STAGE"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "run"
    root.mkdir()
    return root, fresh_store(tmp_path_factory, root)


def test_promote_registers_the_model_in_s3_and_it_loads_back(s3_server, aws_env, tmp_path_factory, tmp_path,
                                                             monkeypatch, tiny_model_dir, sample_tokenizer_dir):
    """`moai promote`'s registration (pyfunc with the export as artifact) into an S3 artifact root; the registered
    version's files come back from S3 through the model registry."""
    import mlflow

    from moai_lib.pipeline.registry import RegisterParams, register_and_promote

    endpoint, client = s3_server
    aws_env()
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    bucket = make_bucket(client, "moai-registry")
    root, uri = _run_root(tmp_path_factory, tmp_path, monkeypatch)
    make_exports(root, tiny_model_dir, sample_tokenizer_dir, variants=("bf16",))
    tracking = TrackingParams(experiment="moai-s3", artifact_location=f"s3://{bucket}/mlflow")
    result = register_and_promote(Params(root, RegisterParams(model_name="tiny-moai-s3"), tracking, ("bf16",)))
    assert result["champion"] == "bf16" and result["registered"] == ["bf16"]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the registry's models:/ URI resolves through both
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    back = mlflow.artifacts.download_artifacts(artifact_uri="models:/tiny-moai-s3@champion",
                                               dst_path=str(tmp_path / "back"))
    export = root / "outputs" / "exports" / "bf16"
    copies = [p for p in Path(back).rglob("model.safetensors")]
    assert copies and copies[0].read_bytes() == (export / "model.safetensors").read_bytes()
    assert any(k.endswith("/model.safetensors") for k in bucket_keys(client, bucket))
