"""The S3 preflight check (`moai_lib.pipeline.storage`) against a real S3 server on loopback (moto's server):
a missing bucket, missing credentials and an unreachable endpoint each stop before any work with one message
naming the URL, what uses it, the cause and the fix; a Metaflow launch on a missing bucket stops before Metaflow
writes anything (without the check, Metaflow without credentials or with the endpoint down waits > 150 s in its
S3 retries, saying nothing).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml
from mlflow_fixtures import free_port
from pipeline_helpers import REPO, tiny_params
from s3_helpers import CREDS, make_bucket

pytest.importorskip("boto3")
pytest.importorskip("moto")

from moai_lib.pipeline.params import PipelineParams  # noqa: E402
from moai_lib.pipeline.storage import StorageError, check_metaflow_datastore, check_s3  # noqa: E402


# The preflight check ------------------------------------------------------------------------------------------
def test_check_s3_accepts_a_usable_bucket_and_names_a_missing_one(s3_server, aws_env, monkeypatch):
    endpoint, client = s3_server
    aws_env()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)  # the standard variable boto3 reads
    bucket = make_bucket(client, "moai-present")
    check_s3(f"s3://{bucket}/some/prefix", "corpus")
    with pytest.raises(StorageError) as err:
        check_s3("s3://moai-absent/x", "Metaflow datastore", setting="METAFLOW_DATASTORE_SYSROOT_S3")
    text = str(err.value)
    for fragment in ("Metaflow datastore s3://moai-absent/x", "METAFLOW_DATASTORE_SYSROOT_S3",
                     "bucket 'moai-absent' does not exist", f"endpoint {endpoint} (from AWS_ENDPOINT_URL_S3)",
                     "aws s3 mb s3://moai-absent"):
        assert fragment in text, text
    assert "moai-absent" not in {b["Name"] for b in client.list_buckets()["Buckets"]}  # the check creates nothing


def test_check_s3_without_credentials_fails_fast_and_says_which_variables(s3_server, aws_env, monkeypatch):
    endpoint, client = s3_server  # aws_env without its credentials: empty files, no metadata service
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        check_s3("s3://moai-present/mlflow", "MLflow artifact root", endpoint_env=("MLFLOW_S3_ENDPOINT_URL",))
    assert time.monotonic() - started < 5
    text = str(err.value)
    for fragment in ("MLflow artifact root s3://moai-present/mlflow", "no AWS credentials found",
                     "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "aws configure"):
        assert fragment in text, text


def test_check_s3_with_the_endpoint_down_names_the_endpoint_variable(aws_env, monkeypatch):
    aws_env()
    port = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        check_s3("s3://bucket/x", "MLflow artifact root", endpoint_env=("MLFLOW_S3_ENDPOINT_URL",), timeout_s=2)
    assert time.monotonic() - started < 15
    text = str(err.value)
    assert "endpoint unreachable" in text and f"127.0.0.1:{port} (from MLFLOW_S3_ENDPOINT_URL)" in text, text


def test_check_s3_with_refused_credentials_says_access_denied(aws_env, tmp_path, monkeypatch):
    """A moto server process with authentication on (INITIAL_NO_AUTH_ACTION_COUNT=0) knows no access key."""
    import socket

    port = free_port()
    log = open(tmp_path / "moto.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "moto.log").read_text()
            time.sleep(0.2)
        aws_env()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        with pytest.raises(StorageError) as err:
            check_s3("s3://moai-private/data", "corpus", setting="tokenize.corpus")
        text = str(err.value)
        for fragment in ("corpus s3://moai-private/data (set by tokenize.corpus)", "access denied",
                         "(from AWS_ENDPOINT_URL)", "access key test…", "AWS_ACCESS_KEY_ID"):
            assert fragment in text, text
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_a_url_corpus_is_refused_with_the_way_to_fetch_it(tmp_path):
    params = tiny_params()
    params["tokenize"]["corpus"] = "s3://bucket/corpus/train.jsonl"
    with pytest.raises(Exception, match=r"^tokenize.corpus: 's3://bucket/corpus/train.jsonl' is a URL.*dvc "
                                        r"import-url"):
        PipelineParams.from_dict(params, root=tmp_path)


# Metaflow -----------------------------------------------------------------------------------------------------
def test_check_metaflow_datastore_follows_metaflow_settings(s3_server, aws_env, monkeypatch):
    endpoint, client = s3_server
    aws_env()
    bucket = make_bucket(client, "moai-metaflow")
    monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", endpoint)
    assert check_metaflow_datastore(["--datastore", "local", "run"]) is None
    # explicit --datastore / --datastore-root, as Metaflow's own options
    args = ["--datastore=s3", "--datastore-root", f"s3://{bucket}/metaflow", "run"]
    assert check_metaflow_datastore(args) == f"s3://{bucket}/metaflow"
    with pytest.raises(StorageError, match="Metaflow datastore s3://moai-nothing/mf .*does not exist"):
        check_metaflow_datastore(["--datastore=s3", "--datastore-root=s3://moai-nothing/mf", "run"])


def test_a_flow_launch_on_a_missing_bucket_stops_before_metaflow_writes(s3_server, aws_env, tmp_path):
    endpoint, _ = s3_server
    aws_env()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "METAFLOW_USER": "tester",
           "METAFLOW_HOME": str(tmp_path / "mf_home"), "METAFLOW_DEFAULT_METADATA": "local",
           "METAFLOW_DEFAULT_DATASTORE": "s3", "METAFLOW_DATASTORE_SYSROOT_S3": "s3://moai-missing/metaflow",
           "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "mf"), "METAFLOW_S3_ENDPOINT_URL": endpoint,
           "AWS_SHARED_CREDENTIALS_FILE": os.environ["AWS_SHARED_CREDENTIALS_FILE"],
           "AWS_CONFIG_FILE": os.environ["AWS_CONFIG_FILE"], "AWS_EC2_METADATA_DISABLED": "true", **CREDS}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(REPO / "flows" / "moai_flow.py"), "--no-pylint", "run"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("moai flow: error: Metaflow datastore s3://moai-missing/metaflow"), out.stderr
    assert "does not exist" in line and "aws s3 mb s3://moai-missing" in line, line
    assert "Traceback" not in out.stderr
    assert elapsed < 60
    assert not (tmp_path / "mf").exists()  # nothing of the run was written anywhere
