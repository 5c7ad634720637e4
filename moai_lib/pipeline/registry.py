"""Register the exported models in the MLflow model registry and point the alias `champion` at the best one.

    moai promote --params params.yaml        # → register_and_promote(PipelineParams.load("params.yaml"))

Each exported variant (`paths.exports/<variant>/`, an HF directory from the export stage) becomes a version of
the registered model `register.model_name`: an MLflow pyfunc "model from code" (`pyfunc_model.py`: loads the
directory with moai_lib and generates text for a `prompt` column) with the directory as its artifact "model",
`moai_lib` as a code path and explicit pip requirements (pinned to the installed versions). Version tags:
`variant`, `method`, `artifact_sha256`, and `metric.<name>` for the variant's row of reports/comparison.csv.

Idempotence: `artifact_sha256` hashes every file of the export except its model card (README.md, which quotes
measured speeds that vary from run to run while the model is the same). A variant whose hash already has a
version is skipped, so re-running `promote` — or the whole pipeline — never duplicates a version.

The champion rule (`RegisterParams`): among the exported variants with a perplexity and a size in
reports/comparison.csv, those whose perplexity is at most `max_ppl_increase_pct` percent above the baseline's
(`baseline`, the bf16 model) are eligible; the champion is the smallest of them (size_mb), ties broken by lower
perplexity, then by name. The baseline itself is always eligible when exported, so with the default 5 % the
champion is the smallest model that gives up at most 5 % perplexity.

Promotion is not a DVC stage (DVC's run cache would restore its outputs without registering anything); it runs
inside a tracking run "register" nested under the pipeline's parent run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import PipelineError

logger = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # moai_lib/
CARD_FILE = "README.md"
# Distributions `import moai_lib` and generation need at load time (torchao: optional quantized kernels).
REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy", "pandas",
                "pyyaml", "tqdm", "torchao")
TAG_VARIANT, TAG_METHOD, TAG_SHA = "variant", "method", "artifact_sha256"


@dataclass
class RegisterParams:
    """The `register:` section of params.yaml (model registry and the champion rule).

    Args:
        model_name: registered model name in the MLflow model registry.
        alias: the alias moved to the champion version.
        baseline: the variant whose perplexity the rule compares against (the bf16 pretrained model).
        max_ppl_increase_pct: eligible variants have ppl ≤ baseline ppl · (1 + max_ppl_increase_pct / 100);
            the champion is the smallest eligible one (see the module docstring).
        max_new_tokens: default generation length of the registered pyfunc (a `predict` param overrides it).
    """

    model_name: str = "moai-mamba"
    alias: str = "champion"
    baseline: str = "bf16"
    max_ppl_increase_pct: float = 5.0
    max_new_tokens: int = 32

    def __post_init__(self):
        if not isinstance(self.model_name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.model_name):
            raise PipelineError(f"register.model_name: must be letters, digits, '.', '_' or '-', got "
                                f"{self.model_name!r}")
        if not isinstance(self.alias, str) or not re.fullmatch(r"[A-Za-z_][\w-]*", self.alias) \
                or re.fullmatch(r"[vV]\d+", self.alias) or self.alias == "latest":
            raise PipelineError(f"register.alias: must be a name of letters, digits, '_' or '-' (not 'latest' or "
                                f"v<number>, which MLflow reserves), got {self.alias!r}")
        if not isinstance(self.baseline, str) or not self.baseline:
            raise PipelineError(f"register.baseline: must be a variant name such as 'bf16', got {self.baseline!r}")
        pct = self.max_ppl_increase_pct
        if isinstance(pct, bool) or not isinstance(pct, int | float) or not math.isfinite(pct) or pct < 0:
            raise PipelineError(f"register.max_ppl_increase_pct: must be a number ≥ 0 (percent), got {pct!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise PipelineError(f"register.max_new_tokens: must be an integer ≥ 1, got {self.max_new_tokens!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RegisterParams:
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise PipelineError(f"register.{unknown[0]}: unknown key; valid keys: "
                                f"{', '.join(f.name for f in fields(cls))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rule(self) -> str:
        return (f"smallest size_mb among variants with ppl <= {self.baseline} ppl * "
                f"(1 + {self.max_ppl_increase_pct:g}/100); ties: lower ppl, then name")


# ---------------------------------------------------------------------------------------------- pieces


def artifact_sha256(export_dir: str | os.PathLike) -> str:
    """sha256 over (relative path, file sha256) of every file of an export except its model card."""
    root = Path(export_dir)
    outer = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == CARD_FILE or "__pycache__" in path.parts:
            continue
        inner = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                inner.update(block)
        outer.update(f"{rel}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def read_comparison(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{variant: row} of reports/comparison.csv, numbers parsed (blank → None)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"register: no comparison table {path}; run the evaluate and report stages first")
    rows: dict[str, dict[str, Any]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = {}
            for key, value in row.items():
                if value in ("", None):
                    parsed[key] = None
                    continue
                try:
                    parsed[key] = float(value)
                except ValueError:
                    parsed[key] = value
            rows[str(row["variant"])] = parsed
    return rows


def choose_champion(rows: dict[str, dict[str, Any]], candidates: list[str], settings: RegisterParams) -> str:
    """The champion among `candidates` by the rule of the module docstring."""
    base = rows.get(settings.baseline)
    if base is None or not _finite(base.get("ppl")):
        raise PipelineError(f"register.baseline: no perplexity for the baseline variant {settings.baseline!r} in "
                            "reports/comparison.csv; evaluate it (and re-run report) or set register.baseline")
    limit = base["ppl"] * (1 + settings.max_ppl_increase_pct / 100)
    scored = [(rows[v]["size_mb"], rows[v]["ppl"], v) for v in candidates
              if v in rows and _finite(rows[v].get("ppl")) and _finite(rows[v].get("size_mb"))]
    eligible = [s for s in scored if s[1] <= limit]
    if not eligible:
        best = min(scored, key=lambda s: s[1], default=None)
        detail = (f"; the best exported one, {best[2]}, is {100 * (best[1] / base['ppl'] - 1):.2f}% above"
                  if best else "; none of the exported variants has a ppl and size_mb in the table")
        raise PipelineError(f"register.max_ppl_increase_pct: no exported variant is within "
                            f"{settings.max_ppl_increase_pct:g}% of the {settings.baseline} perplexity "
                            f"{base['ppl']:.4g}{detail}; raise the threshold or export the baseline")
    return min(eligible)[2]


def pip_requirements() -> list[str]:
    """Explicit requirements pinned to the installed versions (MLflow's inference would import the model)."""
    out = []
    for dist in REQUIREMENTS:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        out.append(f"{dist}=={version.split('+')[0]}")  # drop local tags such as +cpu
    return out


def _signature(max_new_tokens: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "completion")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens),
                            ParamSpec("do_sample", "boolean", False), ParamSpec("temperature", "double", 1.0),
                            ParamSpec("top_k", "long", 50), ParamSpec("top_p", "double", 1.0)]),
    )


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@contextlib.contextmanager
def _fluent_uri(uri: str):
    """Point MLflow's fluent API (used by `log_model`) at `uri` for the block, then restore it exactly.

    `mlflow.set_tracking_uri` also exports $MLFLOW_TRACKING_URI (for subprocesses), and restoring it with the
    public getter would pin the default ./mlflow.db into the environment; so the previous module state and
    environment variables are saved and put back as they were."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def existing_versions(client, model_name: str) -> dict[str, Any]:
    """{artifact_sha256: ModelVersion} of the registered model (empty when it does not exist yet)."""
    out: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_model_versions(f"name = '{model_name}'", page_token=token)
        for mv in page:
            sha = mv.tags.get(TAG_SHA)
            if sha and (sha not in out or int(mv.version) < int(out[sha].version)):
                out[sha] = mv
        token = page.token
        if not token:
            return out


# ---------------------------------------------------------------------------------------------- the command


def register_and_promote(params) -> dict:
    """Register every exported variant not registered yet and set the champion alias (module docstring).

    `params` is a `PipelineParams` (uses .root, .register, .tracking, .variants(), .path("export"/"reports")).
    Returns {"model_name", "champion": variant, "version": its version number, "registered": [variants newly
    registered], "skipped": [variants whose artifact already had a version], "versions": {variant: version},
    "rule": the champion rule in words}.
    """
    from mlflow.exceptions import MlflowException

    from .tracking import connect, stage_run

    settings: RegisterParams = params.register
    exports = {v: params.path("export", variant=v) for v in params.variants()}
    exports = {v: d for v, d in exports.items() if (d / "config.json").is_file()}
    if not exports:
        raise PipelineError(f"register: no exported model in {params.path('export', variant='x').parent}; run the "
                            "export stage(s) first")
    rows = read_comparison(params.path("reports") / "comparison.csv")
    missing = sorted(set(exports) - set(rows))
    if missing:
        raise PipelineError(f"register: exported variant(s) {', '.join(missing)} have no row in "
                            f"{params.path('reports') / 'comparison.csv'}; re-run the evaluate and report stages")
    champion = choose_champion(rows, list(exports), settings)
    result: dict[str, Any] = {"model_name": settings.model_name, "champion": champion, "version": None,
                              "registered": [], "skipped": [], "versions": {}, "rule": settings.rule()}
    if not params.tracking.enabled:
        logger.warning("tracking.enabled is false: nothing registered; the champion by the rule would be %s",
                       champion)
        result["skipped"] = sorted(exports)
        return result

    client, _, uri = connect(params.tracking, params.root)  # fails fast (whatever on_failure says)
    try:
        client.create_registered_model(settings.model_name, tags={"moai.champion_rule": settings.rule()},
                                       description="MOAI pure-Mamba language models; alias "
                                                   f"'{settings.alias}': {settings.rule()}")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    known = existing_versions(client, settings.model_name)
    hashes = {v: artifact_sha256(d) for v, d in exports.items()}

    with stage_run("register", {"register": settings.to_dict()}, settings=params.tracking,
                   root=params.root) as run:
        for variant, export_dir in exports.items():
            sha = hashes[variant]
            if sha in known:
                result["skipped"].append(variant)
                result["versions"][variant] = int(known[sha].version)
                logger.info("%s: artifact %s… already registered as version %s", variant, sha[:12],
                            known[sha].version)
                continue
            version = _register_one(client, uri, run.run_id, settings, variant, export_dir, sha, rows[variant])
            known[sha] = version
            result["registered"].append(variant)
            result["versions"][variant] = int(version.version)
        champion_version = result["versions"][champion]
        client.set_registered_model_alias(settings.model_name, settings.alias, str(champion_version))
        run.set_tags({"moai.champion": champion, "moai.champion_version": champion_version})
    result["version"] = champion_version
    logger.info("%s@%s → version %s (%s); registered %s, skipped %s", settings.model_name, settings.alias,
                champion_version, champion, result["registered"] or "none", result["skipped"] or "none")
    return result


def _register_one(client, uri: str, run_id: str | None, settings: RegisterParams, variant: str, export_dir: Path,
                  sha: str, row: dict[str, Any]):
    """Log the pyfunc model of one export and create its model version with the tags (atomically: a version
    never exists without its artifact hash, so an interrupted promote cannot cause a duplicate later)."""
    import mlflow

    metrics = {k: v for k, v in row.items() if _finite(v)}
    tags = {TAG_VARIANT: variant, TAG_METHOD: str(row.get("method") or variant), TAG_SHA: sha,
            **{f"metric.{k}": repr(float(v)) for k, v in metrics.items()}}
    with _fluent_uri(uri), (mlflow.start_run(run_id=run_id) if run_id else contextlib.nullcontext()), \
            warnings.catch_warnings():
        # The signature is explicit and an input example would load and run the model at logging time.
        warnings.filterwarnings("ignore", r".*(type hints to the `predict`|input example was not provided)",
                                UserWarning)
        info = mlflow.pyfunc.log_model(
            name=f"moai-{variant}",
            python_model=str(PYFUNC_FILE),
            artifacts={"model": str(export_dir)},
            code_paths=[str(PACKAGE_DIR)],
            pip_requirements=pip_requirements(),
            signature=_signature(settings.max_new_tokens),
            model_config={"max_new_tokens": settings.max_new_tokens},
            tags={TAG_VARIANT: variant, TAG_SHA: sha},
        )
        # Inside the block: the registry store resolves `model_id` through the fluent tracking URI.
        version = client.create_model_version(settings.model_name, source=info.model_uri, run_id=run_id, tags=tags,
                                              description=f"{variant} ({tags[TAG_METHOD]}) from {export_dir}",
                                              model_id=info.model_id)
    logger.info("registered %s as %s version %s", variant, settings.model_name, version.version)
    return version
