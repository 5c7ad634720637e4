"""DVC and MLflow keeping their data in S3, against a real S3 server on loopback (moto's server):

- a DVC S3 remote set up as the README says: `dvc push` of the DVC-tracked sample corpus (the project's
  data.dvc), cache and data deleted, `dvc pull` gives the same bytes and the md5s of data.dvc (real `dvc`);
- MLflow artifacts of a tracked stage in an S3 artifact root (`tracking.artifact_location`), read back through
  the MLflow client; a missing bucket stops the stage before MLflow is touched.

Credentials come from the environment only (the `aws_env` fixture): nothing of the machine's AWS setup is used.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import yaml
from mlflow_fixtures import fresh_store
from pipeline_helpers import REPO, SAMPLE, dvc
from s3_helpers import bucket_keys, make_bucket, run_ok

pytest.importorskip("boto3")
pytest.importorskip("moto")

from moai_lib.pipeline.storage import StorageError  # noqa: E402
from moai_lib.pipeline.tracking import TrackingParams, stage_run  # noqa: E402


# DVC ----------------------------------------------------------------------------------------------------------
def test_dvc_s3_remote_push_then_pull_restores_the_corpus(s3_server, aws_env, tmp_path):
    endpoint, client = s3_server
    aws_env()
    bucket = make_bucket(client, "moai-dvc")
    repo = tmp_path / "repo"
    (repo / "data" / "sample").mkdir(parents=True)
    for name in ("train.jsonl", "valid.jsonl"):
        shutil.copyfile(SAMPLE / name, repo / "data" / "sample" / name)
    shutil.copyfile(REPO / "data.dvc", repo / "data.dvc")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    run_ok(["git", "init", "-q"], repo, env)
    run_ok([dvc(), "init", "-q"], repo, env)
    run_ok([dvc(), "commit", "-f", "-q", "data.dvc"], repo, env)  # the project's data.dvc: the md5s must match
    # the documented settings (README "Storage on S3"); credentials from the environment
    run_ok([dvc(), "remote", "add", "-d", "s3", f"s3://{bucket}/moai"], repo, env)
    run_ok([dvc(), "remote", "modify", "s3", "endpointurl", endpoint], repo, env)
    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-qm", "data on s3"], repo, env)
    run_ok([dvc(), "push", "data.dvc"], repo, env)

    expected = {o["path"]: o["md5"] for o in yaml.safe_load((REPO / "data.dvc").read_text())["outs"]}
    stored = bucket_keys(client, bucket)
    for md5 in expected.values():
        assert f"moai/files/md5/{md5[:2]}/{md5[2:]}" in stored, stored

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data")
    run_ok([dvc(), "pull", "data.dvc"], repo, env)
    for path, md5 in expected.items():
        data = (repo / path).read_bytes()
        assert data == (REPO / path).read_bytes(), path
        assert hashlib.md5(data).hexdigest() == md5, path


# MLflow -------------------------------------------------------------------------------------------------------
def _run_root(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MOAI_PIPELINE_ID", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    root = tmp_path / "run"
    root.mkdir()
    (root / "params.yaml").write_text("pretrain:\n  learning_rate: 0.001\n")
    return root, fresh_store(tmp_path_factory, root)


def test_mlflow_artifacts_of_a_stage_go_to_s3_and_read_back(s3_server, aws_env, tmp_path_factory, tmp_path,
                                                            monkeypatch):
    from mlflow import MlflowClient

    endpoint, client = s3_server
    aws_env()
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    bucket = make_bucket(client, "moai-mlflow")
    root, uri = _run_root(tmp_path_factory, tmp_path, monkeypatch)
    report = root / "reports" / "comparison.md"
    report.parent.mkdir()
    report.write_text("| variant | ppl |\n|---|---:|\n| bf16 | 10.0 |\n")
    settings = TrackingParams(artifact_location=f"s3://{bucket}/mlflow")
    with stage_run("report", {"report.x": 1}, settings=settings, root=root) as run:
        run.log_artifact(report.parent, "reports")
        run.log_metrics({"variants": 1})
    assert not run.broken  # nothing was spooled: every record reached the store

    mlflow = MlflowClient(tracking_uri=uri)
    info = mlflow.get_run(run.run_id).info
    assert info.status == "FINISHED" and info.artifact_uri.startswith(f"s3://{bucket}/mlflow/")
    local = mlflow.download_artifacts(run.run_id, "reports/comparison.md", str(tmp_path / "back"))
    assert open(local, "rb").read() == report.read_bytes()
    assert any(k.endswith("/artifacts/reports/comparison.md") for k in bucket_keys(client, bucket))


def test_a_stage_with_an_unusable_s3_artifact_root_stops_before_mlflow_is_touched(s3_server, aws_env,
                                                                                   tmp_path_factory, tmp_path,
                                                                                   monkeypatch):
    from mlflow import MlflowClient

    endpoint, _ = s3_server
    aws_env()
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    root, uri = _run_root(tmp_path_factory, tmp_path, monkeypatch)
    settings = TrackingParams(artifact_location="s3://no-such-bucket/mlflow")
    ran = []
    with pytest.raises(StorageError, match=r"MLflow artifact root s3://no-such-bucket/mlflow \(set by "
                                           r"tracking.artifact_location\): bucket 'no-such-bucket' does not exist"):
        with stage_run("pretrain", {}, settings=settings, root=root):
            ran.append(1)
    assert not ran
    assert MlflowClient(tracking_uri=uri).get_experiment_by_name("moai") is None  # no experiment with a bad root

    settings = TrackingParams(artifact_location="s3://no-such-bucket/mlflow", on_failure="warn")
    with stage_run("pretrain", {}, settings=settings, root=root) as run:  # the documented escape hatch
        ran.append(1)
    assert ran == [1] and run.run_id is None
