"""MLflow tracking of pipeline stages: one parent run per pipeline execution, one nested run per stage.

With `registry.py` (the model registry) and `pyfunc_model.py`, the only modules that import MLflow, lazily.
Everything here goes through an explicit `MlflowClient(tracking_uri)`: no global active run, so a stage cannot
leak MLflow state into the next one in the same process (Metaflow local runs, tests).

Where runs go (`TrackingParams.tracking_uri`): None → `$MLFLOW_TRACKING_URI` when set (e.g. a real
`mlflow server`), else a local sqlite store `sqlite:///<root>/mlruns.db` with artifacts in `<root>/mlartifacts`.

The parent run. Every stage run is nested (tag `mlflow.parentRunId`) under the parent run of its pipeline
execution, found by the tag `moai.pipeline_id` or created. The pipeline id is, first match wins:
  1. the `pipeline_id` argument: the Metaflow flow passes its run id (e.g. `MoaiFlow/1764412345678901`);
  2. `$MOAI_PIPELINE_ID`: a driver script can export one id per invocation;
  3. derived, for DVC, which runs each stage as a separate process with nothing shared but the files:
     `git-<commit[:12]>-params-<sha256(<root>/params.yaml)[:12]>` (no git: `git-none`; no params.yaml: the hash
     of the root path). All stages of one `dvc repro` see the same commit and params file, so they land under
     one parent; a later `dvc repro` / `dvc exp run -S …` with changed params (or a new commit) gets a new
     parent, and re-running a failed stage with nothing changed joins the parent of the run it repairs.
     Uncommitted changes do not change the id (dvc.lock itself changes between the stages of one repro); the
     stage runs carry `moai.git_dirty`.
When two processes create the parent at once (parallel foreach branches), the oldest parent wins and the others
delete theirs. The parent's status follows its latest stage (FINISHED, or FAILED when that stage raised).

What is logged where: the stage's params (flattened, `pretrain.learning_rate`) and its metrics on the stage run
only (each metric key once per run; numeric values as metrics, strings such as `variant` as tags); the parent
carries the pipeline id, git commit and params hash. Tags on both: `moai.pipeline_id`, `moai.git_commit`
(and `mlflow.source.git.commit`), `moai.dvc_stage` (from `$DVC_STAGE`, which DVC sets for every command),
`moai.metaflow_run_id` (from `tags`), `moai.stage`.

Failures (issue 7: a tracking failure must never lose work):
  * Before the stage's work starts, `stage_run` connects (experiment lookup with MLflow's HTTP retries off and
    a `timeout_s` request timeout) and, with `on_failure: fail` (the default), raises `TrackingUnavailableError`
    naming the URI, where it came from (`MLFLOW_TRACKING_URI` or `tracking.tracking_uri`) and the fixes. With
    `on_failure: warn` the stage runs untracked after a warning (its metrics still reach `metrics/<stage>.json`).
  * After the work has started, a tracking error is never raised (a server that dies during a long training run
    must not discard the training): one warning names the run, and that run's remaining records (metrics,
    params, tags, artifacts, its final status) are spooled to `<root>/.mlflow-spool/<run id>.jsonl`. The next
    `connect` to the same URI (the next stage, or `moai promote`) sends them and deletes the spool file:
    continue, then flush when the store is back.
  * A stage that raises marks its run FAILED (tag `moai.error`) and the exception propagates unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import MoaiError
from .errors import PipelineError
from .storage import MLFLOW_S3_ENDPOINT_ENV, StorageError, check_s3, is_s3

logger = logging.getLogger(__name__)

PIPELINE_ID_ENV = "MOAI_PIPELINE_ID"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
ON_FAILURE = ("fail", "warn")
DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
SPOOL_DIR = ".mlflow-spool"  # tracking records of runs whose store went away mid-stage (see StageRun)

# Tag keys (runs); `mlflow.*` ones are MLflow's own and show in its UI.
TAG_PIPELINE_ID = "moai.pipeline_id"
TAG_ROLE = "moai.role"  # "pipeline" on the parent, "stage" on a stage run
TAG_STAGE = "moai.stage"
TAG_STAGE_KIND = "moai.stage_kind"  # the stage name without its "@<method>" / "@<variant>" suffix
TAG_GIT_COMMIT = "moai.git_commit"
TAG_DVC_STAGE = "moai.dvc_stage"
TAG_METAFLOW_RUN_ID = "moai.metaflow_run_id"
TAG_PARAMS_SHA = "moai.params_sha256"
TAG_ERROR = "moai.error"
TAG_RESUMED = "moai.resumed"  # how many times an interrupted stage run was continued
_MLFLOW_PARENT = "mlflow.parentRunId"
_MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"

_MAX_PARAM_LEN = 6000  # MLflow's MAX_PARAM_VAL_LENGTH
_MAX_TAG_LEN = 8000  # MLflow's MAX_TAG_VAL_LENGTH
_BATCH = 100  # MLflow's MAX_PARAMS_TAGS_PER_BATCH


class TrackingConfigError(PipelineError):
    """Invalid `tracking:` params; the message starts with the key (`tracking.<key>`) and says what is valid."""


class TrackingUnavailableError(MoaiError, RuntimeError):
    """The tracking server or store cannot be used; raised before a stage starts its work."""


@dataclass
class TrackingParams:
    """The `tracking:` section of params.yaml.

    Args:
        enabled: track stages in MLflow; False makes `stage_run` a no-op (nothing imported, nothing written).
        tracking_uri: MLflow tracking URI. None → `$MLFLOW_TRACKING_URI`, else `sqlite:///<root>/mlruns.db`
            (artifacts in `<root>/mlartifacts`). The model registry uses the same URI.
        experiment: MLflow experiment holding the pipeline runs (created when missing).
        on_failure: when the tracking server/store is unreachable before a stage starts: "fail" raises
            `TrackingUnavailableError` before any work; "warn" logs a warning and runs the stage untracked.
            Errors after the work has started never stop the stage (see the module docstring).
        timeout_s: seconds allowed to one HTTP request to a tracking server: the pre-stage connection check (no
            retries) and each record sent during the stage (2 retries, then the spool).
        artifact_location: where the experiment keeps its artifacts when this run creates it, e.g.
            s3://BUCKET/mlflow (endpoint from MLFLOW_S3_ENDPOINT_URL, credentials from the AWS variables). None: the
            server's default artifact root, or `<root>/mlartifacts` beside a local sqlite store. An s3:// root
            (set here or by the server) is checked before the stage starts (`storage.check_s3`).
    """

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "moai"
    on_failure: str = "fail"
    timeout_s: float = 10.0
    artifact_location: str | None = None

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise TrackingConfigError(f"tracking.enabled: must be true or false, got {self.enabled!r}")
        if self.tracking_uri is not None and (not isinstance(self.tracking_uri, str) or not self.tracking_uri.strip()):
            raise TrackingConfigError("tracking.tracking_uri: must be a non-empty URI (e.g. http://127.0.0.1:5000 or "
                                      f"sqlite:///mlruns.db) or null, got {self.tracking_uri!r}")
        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise TrackingConfigError(f"tracking.experiment: must be a non-empty name, got {self.experiment!r}")
        if self.on_failure not in ON_FAILURE:
            raise TrackingConfigError(f"tracking.on_failure: must be one of {', '.join(ON_FAILURE)}, "
                                      f"got {self.on_failure!r}")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise TrackingConfigError(f"tracking.timeout_s: must be a number of seconds > 0, got {t!r}")
        loc = self.artifact_location
        if loc is not None and (not isinstance(loc, str) or "://" not in loc):
            raise TrackingConfigError("tracking.artifact_location: must be a URI (e.g. s3://BUCKET/mlflow or "
                                      f"file:///abs/dir) or null, got {loc!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TrackingParams:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrackingConfigError(f"tracking.{unknown[0]}: unknown key; valid keys: "
                                      f"{', '.join(f.name for f in fields(cls))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolve_uri(self, root: str | os.PathLike) -> tuple[str, str]:
        """(tracking URI, where it came from: "tracking.tracking_uri", "MLFLOW_TRACKING_URI" or "default")."""
        if self.tracking_uri:
            return self.tracking_uri, "tracking.tracking_uri"
        env = os.environ.get(TRACKING_URI_ENV, "").strip()
        if env:
            return env, TRACKING_URI_ENV
        return f"sqlite:///{Path(root).resolve() / DEFAULT_DB}", "default"


# ---------------------------------------------------------------------------------------------- pipeline id


def git_commit(root: str | os.PathLike) -> tuple[str | None, bool]:
    """(HEAD commit of the git repository holding `root`, whether its working tree is dirty); (None, False)
    outside git."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, False
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, bool(status)


def params_file_sha256(root: str | os.PathLike, name: str = "params.yaml") -> str:
    """sha256 of `<root>/params.yaml`; without one, of the resolved root path (stages of one run dir share it)."""
    path = Path(root) / name
    data = path.read_bytes() if path.is_file() else os.fsencode(Path(root).resolve())
    return hashlib.sha256(data).hexdigest()


def resolve_pipeline_id(root: str | os.PathLike, pipeline_id: str | None = None) -> str:
    """The pipeline id by the rule in the module docstring: argument, `$MOAI_PIPELINE_ID`, else derived from the
    git commit and the hash of `<root>/params.yaml`."""
    if pipeline_id:
        return str(pipeline_id)
    env = os.environ.get(PIPELINE_ID_ENV, "").strip()
    if env:
        return env
    commit, _ = git_commit(root)
    return f"git-{commit[:12] if commit else 'none'}-params-{params_file_sha256(root)[:12]}"


# ---------------------------------------------------------------------------------------------- flattening


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists stay values (logged as JSON)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _key(name: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space and /; anything else (e.g. "@") becomes "_".
    return re.sub(r"[^\w\-. /]", "_", name)[:250]


def _text(value: Any, limit: int) -> str:
    s = value if isinstance(value, str) else json.dumps(value, default=str) if isinstance(value, list | tuple) \
        else str(value)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real)  # int, float, bool, numpy scalars


# ---------------------------------------------------------------------------------------------- runs


class NoopRun:
    """What `stage_run` yields when tracking is disabled or unavailable (on_failure: warn): same API, no effect."""

    run_id: str | None = None
    parent_run_id: str | None = None
    pipeline_id: str | None = None
    tracking_uri: str | None = None

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass


class StageRun(NoopRun):
    """A live stage run. An MLflow error logs one warning; from then on the run's records (metrics, params, tags,
    artifacts, its end) go to the spool `<root>/.mlflow-spool/<run id>.jsonl`, replayed by the next `connect`
    that reaches the same store (see "Failures" in the module docstring). The stage's work never stops."""

    def __init__(self, client, run_id: str, parent_run_id: str, pipeline_id: str, tracking_uri: str,
                 spool_dir: Path | None = None, timeout_s: float | None = None):
        self._client = client
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.pipeline_id = pipeline_id
        self.tracking_uri = tracking_uri
        self.spool_dir = spool_dir
        self.timeout_s = timeout_s
        self._logged: set[str] = set()
        self.broken = False

    def _do(self, op: dict, what: str) -> None:
        op = {"uri": self.tracking_uri, "run_id": self.run_id, **op}
        if not self.broken:
            try:
                # Short HTTP timeouts and few retries: a dead server costs seconds, not MLflow's default minutes
                # of backoff, before the records go to the spool.
                with _http_env(self.timeout_s, retries=2) if self.timeout_s else contextlib.nullcontext():
                    _apply(self._client, op)
                return
            except Exception as e:  # noqa: BLE001 - any tracking error: keep the stage's work, spool the rest
                self.broken = True
                logger.warning("MLflow tracking failed while %s on run %s at %s (%s: %s); the stage continues, "
                               "its tracking records are spooled to %s and sent when the store is back (its "
                               "metrics are also in metrics/*.json)", what, self.run_id, self.tracking_uri,
                               type(e).__name__, e, self.spool_dir)
        if self.spool_dir is not None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            with open(self.spool_dir / f"{self.run_id}.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(op) + "\n")

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric values as metrics and strings as tags, each key once per run without `step` (a repeated
        key is skipped with a warning); with `step`, a metric history (e.g. a loss curve)."""
        now = int(time.time() * 1000)
        values, tags = [], []
        for name, value in flatten(metrics).items():
            key = _key(name)
            if value is None:
                continue
            if step is None:
                if key in self._logged:
                    logger.warning("metric %r was already logged on run %s; each metric is logged once, "
                                   "the new value %r is dropped", key, self.run_id, value)
                    continue
                self._logged.add(key)
            if _is_number(value):
                values.append([key, float(value), now, step or 0])
            else:
                tags.append([key, _text(value, _MAX_TAG_LEN)])
        if values or tags:
            self._do({"op": "batch", "metrics": values, "tags": tags}, "logging metrics")

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [[_key(k), _text(v, _MAX_PARAM_LEN)] for k, v in flatten(params).items()]
        if items:
            self._do({"op": "batch", "params": items}, "logging params")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [[_key(k), _text(v, _MAX_TAG_LEN)] for k, v in tags.items() if v is not None]
        if items:
            self._do({"op": "batch", "tags": items}, "setting tags")

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or a directory (recursively) to the run's artifacts."""
        self._do({"op": "artifact", "path": os.fspath(Path(path).resolve()), "artifact_path": artifact_path},
                 f"uploading {path}")

    def _end(self, status: str, error: BaseException | None = None) -> None:
        message = _text(f"{type(error).__name__}: {error}", _MAX_TAG_LEN) if error is not None else None
        self._do({"op": "end", "status": status, "error": message, "parent_run_id": self.parent_run_id},
                 f"ending the run as {status}")


def _apply(client, op: dict) -> None:
    """Send one tracking record (see `StageRun`) to the store."""
    from mlflow.entities import Metric, Param, RunTag

    run_id = op["run_id"]
    if op["op"] == "batch":
        metrics = [Metric(*m) for m in op.get("metrics", [])]
        params = [Param(*p) for p in op.get("params", [])]
        tags = [RunTag(*t) for t in op.get("tags", [])]
        for i in range(0, max(len(metrics), len(params), len(tags)), _BATCH):
            client.log_batch(run_id, metrics=metrics[i:i + _BATCH], params=params[i:i + _BATCH],
                             tags=tags[i:i + _BATCH])
    elif op["op"] == "artifact":
        if Path(op["path"]).is_dir():
            client.log_artifacts(run_id, op["path"], op["artifact_path"])
        elif Path(op["path"]).is_file():
            client.log_artifact(run_id, op["path"], op["artifact_path"])
        else:
            logger.warning("artifact %s of run %s no longer exists; not uploaded", op["path"], run_id)
    elif op["op"] == "end":
        if op.get("error"):
            client.set_tag(run_id, TAG_ERROR, op["error"])
        client.set_terminated(run_id, op["status"])
        # The parent's status follows its latest stage.
        client.set_terminated(op["parent_run_id"], "FINISHED" if op["status"] == "FINISHED" else "FAILED")
    else:
        raise ValueError(f"unknown tracking record {op['op']!r}")


def spool_dir(root: str | os.PathLike) -> Path:
    return Path(root) / SPOOL_DIR


def flush_spool(client, uri: str, root: str | os.PathLike) -> int:
    """Send the records spooled while `uri` was unreachable (oldest file first); returns how many were sent.
    A record that fails again stays in the spool with the ones after it."""
    sent = 0
    for path in sorted(spool_dir(root).glob("*.jsonl"), key=lambda p: p.stat().st_mtime):
        ops = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not ops or ops[0].get("uri") != uri:
            continue
        for i, op in enumerate(ops):
            try:
                _apply(client, op)
            except Exception as e:  # noqa: BLE001 - still failing: keep the rest for the next attempt
                path.write_text("".join(json.dumps(o) + "\n" for o in ops[i:]), encoding="utf-8")
                logger.warning("could not send spooled tracking records of run %s (%s: %s); kept in %s",
                               op["run_id"], type(e).__name__, e, path)
                return sent
            sent += 1
        path.unlink()
        logger.info("sent %d spooled tracking record(s) of run %s to %s", len(ops), ops[0]["run_id"], uri)
    return sent


def _interrupted_stage_run(client, experiment_id: str, parent_id: str, stage: str, params: Mapping[str, Any]):
    """The newest run of `stage` under `parent_id` that did not finish (FAILED, KILLED, or RUNNING after a
    kill -9) and was logged with the same params, or None. Re-running a stage after a crash (a resumed training
    run, a repaired quantization) thus continues the same MLflow run instead of leaving a failed one behind."""
    runs = client.search_runs(
        [experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{_MLFLOW_PARENT}` = '{parent_id}' and tags.`{TAG_STAGE}` = '{stage}'")
    if not runs or runs[0].info.status == "FINISHED":
        return None
    logged = runs[0].data.params
    wanted = {_key(k): _text(v, _MAX_PARAM_LEN) for k, v in flatten(params).items()}
    return runs[0] if all(logged.get(k) == v for k, v in wanted.items()) else None


@contextlib.contextmanager
def _http_env(timeout_s: float, retries: int = 0) -> Iterator[None]:
    """MLflow retries an HTTP request 7 times with exponential backoff and a 120 s timeout by default (minutes
    for a dead server): `retries` retries and a `timeout_s` timeout inside the block (read per request)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _unavailable_message(uri: str, source: str, error: BaseException) -> str:
    where = {"MLFLOW_TRACKING_URI": "the environment variable MLFLOW_TRACKING_URI",
             "tracking.tracking_uri": "params tracking.tracking_uri"}.get(source, "the default local store")
    return (f"MLflow tracking at {uri} (from {where}) is unreachable: {type(error).__name__}: {error}. "
            f"Nothing was run. Fix: start the server (e.g. `mlflow server --host 127.0.0.1 --port 5000`) or "
            f"correct MLFLOW_TRACKING_URI; or unset MLFLOW_TRACKING_URI to track in the local sqlite store "
            f"(<root>/{DEFAULT_DB}); or set tracking.on_failure=warn to run untracked, or tracking.enabled=false.")


def connect(settings: TrackingParams, root: str | os.PathLike):
    """(MlflowClient, experiment id, tracking URI) after a connection check bounded by `settings.timeout_s`.

    Raises `TrackingUnavailableError` with the fix when the store or server cannot be used, and
    `storage.StorageError` when the experiment's artifact root is an S3 bucket these credentials cannot use."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, source = settings.resolve_uri(root)
    artifact_location = settings.artifact_location
    if is_s3(artifact_location):  # before MLflow is touched: nothing is created for an unusable bucket
        check_s3(artifact_location, "MLflow artifact root", setting="tracking.artifact_location",
                 endpoint_env=(MLFLOW_S3_ENDPOINT_ENV,), timeout_s=settings.timeout_s)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingUnavailableError(_unavailable_message(uri, source, e)) from e
        # Artifacts beside the database (MLflow's default would be ./mlruns in whatever the cwd is).
        artifact_location = artifact_location or (db.parent / DEFAULT_ARTIFACTS).resolve().as_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        with _http_env(settings.timeout_s):
            experiment = client.get_experiment_by_name(settings.experiment)
            if experiment is None:
                try:
                    experiment_id = client.create_experiment(settings.experiment, artifact_location=artifact_location)
                except MlflowException as e:  # created meanwhile by a parallel stage
                    if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                        raise
                    experiment_id = client.get_experiment_by_name(settings.experiment).experiment_id
            elif experiment.lifecycle_stage == "deleted":
                raise TrackingUnavailableError(
                    f"MLflow experiment {settings.experiment!r} at {uri} is deleted; restore it "
                    f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or choose another "
                    f"name in tracking.experiment")
            else:
                experiment_id = experiment.experiment_id
                if settings.artifact_location and experiment.artifact_location != settings.artifact_location:
                    logger.warning("tracking.artifact_location %s is ignored: experiment %r already keeps its "
                                   "artifacts in %s (choose another tracking.experiment to use the new location)",
                                   settings.artifact_location, settings.experiment, experiment.artifact_location)
            location = experiment.artifact_location if experiment is not None else artifact_location
            if location is None:  # just created with the server's default artifact root
                location = client.get_experiment(experiment_id).artifact_location
    except TrackingUnavailableError:
        raise
    except Exception as e:  # noqa: BLE001 - connection refused, timeout, HTTP 5xx, unreadable sqlite file, ...
        raise TrackingUnavailableError(_unavailable_message(uri, source, e)) from e
    if is_s3(location) and location != settings.artifact_location:  # a root the params did not set (checked above)
        check_s3(location, "MLflow artifact root", setting=f"experiment {settings.experiment!r} at {uri}",
                 endpoint_env=(MLFLOW_S3_ENDPOINT_ENV,), timeout_s=settings.timeout_s)
    flush_spool(client, uri, root)
    return client, experiment_id, uri


@contextlib.contextmanager
def _root_lock(root: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock file in the run's spool directory (processes on one machine: DVC stages, local
    Metaflow branches). Across machines the oldest-parent-wins rule of `_find_or_create_parent` still applies."""
    import fcntl

    lock_dir = spool_dir(root)
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "parent.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _find_or_create_parent(client, experiment_id: str, pipeline_id: str, tags: dict[str, str]) -> str:
    def parents() -> list:
        return client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG_PIPELINE_ID}` = '{pipeline_id}' and tags.`{TAG_ROLE}` = 'pipeline'",
            order_by=["attributes.start_time ASC"], max_results=50)

    found = parents()
    if found:
        return min(found, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
    mine = client.create_run(experiment_id, tags={**tags, TAG_ROLE: "pipeline"}, run_name=f"pipeline {pipeline_id}")
    found = parents()
    winner = min(found, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if found else mine.info.run_id
    if winner != mine.info.run_id:  # a parallel stage created the parent first: keep one parent
        client.delete_run(mine.info.run_id)
    return winner


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], *, settings: TrackingParams, root: str | os.PathLike,
              pipeline_id: str | None = None, tags: Mapping[str, Any] | None = None) -> Iterator[NoopRun]:
    """Track one stage as a run nested under its pipeline's parent run (see the module docstring).

    Args:
        stage: stage name, e.g. "pretrain" or "quantize@gptq" (run name and tag `moai.stage`).
        params: the stage's parameters; logged flattened (`{"a": {"b": 1}}` → `a.b`) on the stage run.
        settings: the `tracking:` params.
        root: the run directory (holds params.yaml; the default sqlite store goes there).
        pipeline_id: the pipeline execution id (Metaflow passes its run id); None: `$MOAI_PIPELINE_ID` or derived.
        tags: extra tags for the stage run, e.g. {"moai.metaflow_run_id": "...", "variant": "bf16"}.

    Yields a `StageRun` (`.run_id`, `.log_metrics(dict)`, `.log_params(dict)`, `.set_tags(dict)`,
    `.log_artifact(path)`), or a `NoopRun` when tracking is disabled or unavailable with on_failure "warn".
    Raises `TrackingUnavailableError` before the body runs when the store is unreachable (on_failure "fail").
    """
    if not settings.enabled:
        yield NoopRun()
        return
    try:
        client, experiment_id, uri = connect(settings, root)
    except (TrackingUnavailableError, StorageError) as e:
        if settings.on_failure == "fail":
            raise
        logger.warning("%s\nRunning stage %s untracked (tracking.on_failure=warn).", e, stage)
        yield NoopRun()
        return

    pid = resolve_pipeline_id(root, pipeline_id).replace("'", "_")  # it goes into a search filter string
    commit, dirty = git_commit(root)
    common = {TAG_PIPELINE_ID: pid, TAG_GIT_COMMIT: commit, _MLFLOW_GIT_COMMIT: commit,
              "moai.git_dirty": str(dirty).lower() if commit else None}
    extra = {k: v for k, v in dict(tags or {}).items() if v is not None}
    if "metaflow_run_id" in extra:  # accept the short name too
        extra[TAG_METAFLOW_RUN_ID] = extra.pop("metaflow_run_id")
    stage_tags = {**common, TAG_ROLE: "stage", TAG_STAGE: stage, TAG_STAGE_KIND: stage.split("@")[0],
                  TAG_DVC_STAGE: os.environ.get("DVC_STAGE"), **extra}
    try:
        parent_tags = {**common, TAG_PARAMS_SHA: params_file_sha256(root), TAG_DVC_STAGE: None,
                       TAG_METAFLOW_RUN_ID: extra.get(TAG_METAFLOW_RUN_ID)}
        with _root_lock(root):  # stages started together on this machine agree on one parent
            parent_id = _find_or_create_parent(client, experiment_id, pid,
                                               {k: str(v) for k, v in parent_tags.items() if v is not None})
        run_tags = {k: _text(v, _MAX_TAG_LEN) for k, v in stage_tags.items() if v is not None}
        run = _interrupted_stage_run(client, experiment_id, parent_id, stage, params)
        if run is not None:  # the same stage with the same params died under this parent: continue its run
            client.update_run(run.info.run_id, status="RUNNING")
            client.set_tag(run.info.run_id, TAG_RESUMED, str(int(run.data.tags.get(TAG_RESUMED, "0")) + 1))
            if TAG_ERROR in run.data.tags:
                client.delete_tag(run.info.run_id, TAG_ERROR)
        else:
            run = client.create_run(experiment_id, run_name=stage, tags={_MLFLOW_PARENT: parent_id, **run_tags})
    except Exception as e:  # noqa: BLE001 - the store answered the check but failed now: same policy
        if settings.on_failure == "fail":
            raise TrackingUnavailableError(_unavailable_message(uri, settings.resolve_uri(root)[1], e)) from e
        logger.warning("could not create the MLflow run of stage %s (%s); running it untracked", stage, e)
        yield NoopRun()
        return

    handle = StageRun(client, run.info.run_id, parent_id, pid, uri, spool_dir(root), settings.timeout_s)
    handle.log_params(params)
    logger.info("MLflow run %s (stage %s, pipeline %s) at %s", handle.run_id, stage, pid, uri)
    try:
        yield handle
    except BaseException as e:
        handle._end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", e)
        raise
    handle._end("FINISHED")
