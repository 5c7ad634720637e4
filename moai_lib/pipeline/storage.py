"""S3 storage: one preflight check for every s3:// URL the pipeline meets, run before any heavy work.

Where the pipeline meets S3 and who checks it:
  * MLflow artifacts (`tracking.artifact_location`, or the artifact root a tracking server gives the
    experiment): `tracking.connect`, before a stage starts and before `moai promote` registers anything.
    Endpoint: `MLFLOW_S3_ENDPOINT_URL` (what MLflow's S3 artifact store reads), else the AWS variables.
  * Metaflow's S3 datastore (`METAFLOW_DEFAULT_DATASTORE=s3` or `--datastore s3`, root
    `METAFLOW_DATASTORE_SYSROOT_S3`): `check_metaflow_datastore`, called by flows/moai_flow.py at launch, before
    Metaflow writes its first artifact. Endpoint: `METAFLOW_S3_ENDPOINT_URL`, else the AWS variables.
  * A DVC S3 remote: DVC itself (`dvc push` / `dvc pull` say what is wrong); nothing of moai runs there.

`check_s3` asks for the credentials first (no network: botocore's chain of environment, shared files, profile; set
AWS_EC2_METADATA_DISABLED=true off EC2 to skip the instance-metadata lookup), then lists at most one key under the
URL's prefix (ListObjectsV2) with short timeouts and one retry. A failure raises `StorageError` naming the URL,
what uses it, the cause (no credentials found / bucket does not exist / access denied / endpoint unreachable /
wrong region) and the fix, in seconds, so that no GPU is held while a run fails later at its first upload.

Endpoints: boto3 (botocore >= 1.31) reads AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL; a tool-specific
variable (MLFLOW_S3_ENDPOINT_URL, METAFLOW_S3_ENDPOINT_URL) passed as `endpoint_env` takes precedence, as it
does in that tool.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..errors import MoaiError

AWS_ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
MLFLOW_S3_ENDPOINT_ENV = "MLFLOW_S3_ENDPOINT_URL"
METAFLOW_S3_ENDPOINT_ENV = "METAFLOW_S3_ENDPOINT_URL"
_CREDENTIALS_FIX = ("export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with a profile in "
                    "~/.aws/credentials, or run `aws configure`)")


class StorageError(MoaiError, RuntimeError):
    """An s3:// location cannot be used (no credentials, no bucket, access denied, endpoint unreachable);
    raised before the work that needs it starts."""


def is_s3(url: object) -> bool:
    return isinstance(url, str) and url.startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix → ("bucket", "some/prefix")."""
    if not is_s3(url):
        raise StorageError(f"{url!r} is not an s3:// URL; write it as s3://BUCKET/PREFIX")
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{url!r} names no bucket; write it as s3://BUCKET/PREFIX")
    return bucket, key


def resolve_endpoint(endpoint_env: Sequence[str] = ()) -> tuple[str | None, str]:
    """(endpoint URL or None for AWS itself, where it came from: the variable's name or "AWS default")."""
    for name in (*endpoint_env, *AWS_ENDPOINT_ENVS):
        value = os.environ.get(name, "").strip()
        if value:
            return value, name
    return None, "AWS default"


def check_s3(url: str, what: str, *, setting: str | None = None, endpoint_env: Sequence[str] = (),
             endpoint_url: str | None = None, endpoint_source: str = "the given endpoint",
             timeout_s: float = 10.0) -> None:
    """Check that the bucket of `url` exists and that these credentials may list its prefix; `StorageError`
    otherwise.

    Args:
        url: s3://BUCKET[/PREFIX].
        what: what uses it, for the message ("MLflow artifact root", "Metaflow datastore", ...).
        setting: where the URL was set (a params key or an environment variable), for the message's fix.
        endpoint_env: tool-specific endpoint variables tried before AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL.
        endpoint_url: an explicit endpoint (wins over every variable); `endpoint_source` says where it came from.
        timeout_s: connect and read timeout of the one request.
    """
    bucket, prefix = split_s3_url(url)
    where = f" (set by {setting})" if setting else ""
    head = f"{what} {url}{where}"
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ParamValidationError
    except ImportError:
        raise StorageError(f"{head}: boto3 is not installed; fix: pip install boto3 (MLflow's and Metaflow's "
                           "S3 support need it as well)") from None
    if endpoint_url:
        endpoint, source = endpoint_url, endpoint_source
    else:
        endpoint, source = resolve_endpoint(endpoint_env)
    at = f"endpoint {endpoint} (from {source})" if endpoint else "AWS S3"

    try:
        session = boto3.session.Session()
        credentials = session.get_credentials()
    except BotoCoreError as exc:  # e.g. AWS_PROFILE names a profile that does not exist
        raise StorageError(f"{head}: cannot read the AWS credentials ({exc}); fix: {_CREDENTIALS_FIX}") from None
    if credentials is None:
        files = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
        raise StorageError(f"{head}: no AWS credentials found (none in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                           f"AWS_PROFILE, {files}, AWS_CONFIG_FILE or instance metadata); nothing was run; fix: "
                           f"{_CREDENTIALS_FIX}")

    client = session.client("s3", endpoint_url=endpoint, config=Config(
        connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 2, "mode": "standard"}))
    try:
        # ListObjectsV2 of the prefix, not HeadBucket: a policy may grant s3:ListBucket on the prefix only.
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(exc.response.get("Error", {}).get("Code", status))
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"{head}: bucket {bucket!r} does not exist at {at}; nothing was run; fix: create "
                               f"it (`aws s3 mb s3://{bucket}`) or correct the URL{where}") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            key = getattr(credentials, "access_key", None) or "?"
            raise StorageError(f"{head}: access denied to bucket {bucket!r} at {at} for access key "
                               f"{key[:4]}…; nothing was run; fix: use credentials allowed s3:ListBucket, "
                               "s3:GetObject and s3:PutObject on it (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                               "AWS_PROFILE), or another bucket") from None
        if code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
            region = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
            raise StorageError(f"{head}: bucket {bucket!r} is in another region"
                               f"{f' ({region})' if region else ''} than {session.region_name or 'us-east-1'}; "
                               f"nothing was run; fix: export AWS_DEFAULT_REGION={region or '<its region>'}") from None
        raise StorageError(f"{head}: S3 at {at} answered {code} to ListObjectsV2; nothing was run") from None
    except ParamValidationError as exc:  # e.g. a bucket name S3 does not allow
        raise StorageError(f"{head}: not a valid S3 location ({' '.join(str(exc).split())}); fix: correct the "
                           f"URL{where}") from None
    except NoCredentialsError:
        raise StorageError(f"{head}: no AWS credentials found; nothing was run; fix: {_CREDENTIALS_FIX}") from None
    except BotoCoreError as exc:  # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ...
        variables = "/".join((*endpoint_env, *AWS_ENDPOINT_ENVS))
        raise StorageError(f"{head}: endpoint unreachable: {at}: {type(exc).__name__}: {exc}; nothing was run; "
                           f"fix: start the S3 service or correct {variables}") from None


def metaflow_datastore(argv: Sequence[str] | None = None) -> tuple[str, str | None]:
    """(datastore type, S3 root) of a Metaflow launch: `--datastore X` in argv, else Metaflow's configuration
    (METAFLOW_DEFAULT_DATASTORE, METAFLOW_DATASTORE_SYSROOT_S3, or $METAFLOW_HOME/config.json)."""
    from metaflow import metaflow_config as mc

    argv = list(sys.argv if argv is None else argv)
    datastore = mc.DEFAULT_DATASTORE
    for i, arg in enumerate(argv):
        if arg.startswith("--datastore="):
            datastore = arg.split("=", 1)[1]
        elif arg == "--datastore" and i + 1 < len(argv):
            datastore = argv[i + 1]
    root = None
    for i, arg in enumerate(argv):
        if arg.startswith("--datastore-root="):
            root = arg.split("=", 1)[1]
        elif arg == "--datastore-root" and i + 1 < len(argv):
            root = argv[i + 1]
    return datastore, root or mc.DATASTORE_SYSROOT_S3


def check_metaflow_datastore(argv: Sequence[str] | None = None) -> str | None:
    """When a Metaflow launch uses the S3 datastore, `check_s3` its root; returns the checked URL (None for a
    local datastore)."""
    datastore, root = metaflow_datastore(argv)
    if datastore != "s3":
        return None
    if not root:
        raise StorageError("Metaflow datastore: METAFLOW_DEFAULT_DATASTORE is s3 but no S3 root is set; nothing was "
                           "run; fix: export METAFLOW_DATASTORE_SYSROOT_S3=s3://BUCKET/metaflow")
    from metaflow import metaflow_config as mc

    endpoint = getattr(mc, "S3_ENDPOINT_URL", None)
    check_s3(root, "Metaflow datastore", setting="METAFLOW_DATASTORE_SYSROOT_S3 (or --datastore-root)",
             endpoint_url=endpoint, endpoint_source=f"{METAFLOW_S3_ENDPOINT_ENV} (Metaflow's configuration)",
             endpoint_env=(METAFLOW_S3_ENDPOINT_ENV,))
    return root
