"""Fixtures of the S3 tests: a real S3 server on loopback (moto's server, one per test module) and an AWS
environment that uses nothing of the machine's own AWS setup."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))  # pipeline_helpers, mlflow_fixtures

from s3_helpers import AWS_VARS, CREDS  # noqa: E402


@pytest.fixture(scope="module")
def s3_server():
    """(endpoint URL, boto3 client) of a moto S3 server on a free loopback port."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    yield endpoint, client
    server.stop()


@pytest.fixture
def aws_env(tmp_path, monkeypatch):
    """An AWS environment with nothing from the machine: empty credential/config files, no instance metadata,
    no endpoint variables. Returns a function that adds the test credentials (`with_credentials()`)."""
    for name in AWS_VARS + tuple(CREDS):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "aws_credentials").write_text("")
    (tmp_path / "aws_config").write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws_credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws_config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    def with_credentials():
        for name, value in CREDS.items():
            monkeypatch.setenv(name, value)

    return with_credentials
