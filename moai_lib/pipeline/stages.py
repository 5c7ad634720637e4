"""The pipeline stages as functions of `PipelineParams`, and `run_stage`, the one entry the drivers call.

    tokenize → pretrain → qat ─────────────────────→ evaluate(qat) ───┐
                        └──→ quantize(method) ──────→ evaluate(method) ┼→ report
                        └───────────────────────────→ evaluate(bf16) ──┘   export (all variants)

Every stage writes its outputs into a hidden temporary directory beside the final one and renames it into
place only when complete, and writes `metrics/<stage>[_<method|variant>].json` atomically last: a stage that
fails (or is killed) leaves the previous outputs as they were and nothing half-written for DVC to cache or
MLflow to register; running it again completes it. Training stages keep resumable checkpoints in
`outputs/checkpoints/<stage>/` (DVC `persist`), started afresh when the run they belong to changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from .errors import PipelineError
from .params import CALIBRATED, PipelineParams

logger = logging.getLogger(__name__)

STAGES = ("tokenize", "pretrain", "qat", "quantize", "evaluate", "report", "export")
RUN_FILE = "run.json"  # in a checkpoint directory: the fingerprint of the run its checkpoints belong to
# TrainParams that do not change what is trained: changing them keeps the checkpoints (e.g. a longer
# time_budget_s to continue a sliced run).
_NOT_IN_FINGERPRINT = ("progress", "log_every", "time_budget_s", "save_every", "keep_checkpoints", "eval_every",
                       "eval_batches", "eval_batch_size", "resume")


# Small file-system helpers ------------------------------------------------------------------------------------
def write_json_atomic(path: Path, data) -> None:
    """Temp file + fsync + rename: readers (and DVC) see the old file or the new one, never half of one."""
    from ..data.tokenizer import fsync_dir

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _remove_stale_temps(target: Path) -> None:
    """Temporary siblings left by a process killed mid-write (`make_temp_dir` names them .<name>.tmp-*)."""
    if target.parent.is_dir():
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(target: Path):
    """Yield a fresh temporary directory beside `target`; on success it replaces `target` atomically, on any
    error it is removed and `target` is left untouched."""
    from ..data.tokenizer import make_temp_dir, replace_dir

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = make_temp_dir(target)
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _prepare_checkpoint_dir(work: Path, fingerprint: dict) -> None:
    """Keep `work`'s checkpoints only if they belong to the same run (same params, data and starting model);
    otherwise start over, so that a changed param re-runs instead of failing to resume."""
    run_file = work / RUN_FILE
    try:
        same = json.loads(run_file.read_text(encoding="utf-8")) == fingerprint
    except (OSError, ValueError):
        same = False
    if not same and work.exists():
        logger.info("%s: the run changed; discarding its old checkpoints", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not same:
        write_json_atomic(run_file, fingerprint)


def _ranks() -> tuple[int, int]:
    """(global rank, local rank) of this process under torchrun / accelerate launch; (0, 0) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _wait_for_fingerprint(work: Path, fingerprint: dict, timeout_s: float = 600.0) -> None:
    """Other local ranks of a distributed stage: wait until local rank 0 has prepared the checkpoint directory."""
    run_file, deadline = work / RUN_FILE, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(run_file.read_text(encoding="utf-8")) == fingerprint:
                return
        time.sleep(0.2)
    raise PipelineError(f"local rank 0 did not prepare {work} within {timeout_s:.0f} s; is it running the same params?")


def _train_fingerprint(train_params) -> dict:
    return {k: v for k, v in train_params.to_dict().items() if k not in _NOT_IN_FINGERPRINT}


def _numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


# Stages ------------------------------------------------------------------------------------------------------
def stage_tokenize(params: PipelineParams) -> dict:
    """Corpus → tokenizer → packed train/valid shards in paths.data (written atomically by `write_shards`)."""
    from ..data import DataError, prepare_data

    try:
        return prepare_data(params.tokenize, params.path("data"))
    except DataError as exc:
        text = " ".join(str(exc).split())
        valid = params.tokenize.valid_corpus or []
        if "tokenizer" in text and params.tokenize.tokenizer is not None:
            param = "tokenize.tokenizer"
        elif any(os.path.basename(v) in text for v in valid):
            param = "tokenize.valid_corpus"
        else:
            param = "tokenize.corpus"
        raise PipelineError(f"{param}: {text}") from None


def _train(params: PipelineParams, stage: str, train_params, model_or_config, target: Path, fingerprint: dict,
           finalize: Callable | None = None) -> dict:
    """`pretrain` into the stage's checkpoint directory, then move its final model to `target`."""
    from ..data.tokenizer import replace_dir
    from ..train import TrainConfigError, pretrain

    data = params.path("data")
    work = params.path("checkpoints", stage=stage)
    rank, local_rank = _ranks()
    if local_rank == 0:  # one process per machine prepares the checkpoint directory, the others wait for it
        _prepare_checkpoint_dir(work, fingerprint)
    else:
        _wait_for_fingerprint(work, fingerprint)
    try:
        metrics = pretrain(train_params, model_or_config, data, work, finalize_model=finalize)
    except TrainConfigError as exc:
        raise PipelineError(f"{'pretrain' if stage == 'pretrain' else 'qat.train'}: {exc}") from None
    if rank != 0:  # rank 0 writes the model and the metrics
        return {}
    if not metrics["completed"]:
        raise PipelineError(f"{stage}: stopped at step {metrics['step']} of {metrics['total_steps']} (time budget or "
                            f"signal); run the stage again to resume from {work / 'checkpoints'}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    replace_dir(Path(metrics["model_dir"]), target)
    metrics = {k: v for k, v in metrics.items() if k not in ("history", "model_dir")}
    if metrics.get("val_ppl") is not None and metrics.get("valid_unigram_ppl"):
        # The run learned more than token frequencies: perplexity below the unigram model's.
        metrics["val_ppl_vs_unigram"] = metrics["val_ppl"] / metrics["valid_unigram_ppl"]
    return metrics


def stage_pretrain(params: PipelineParams) -> dict:
    """Train the model of `model:` on the shards; the final HF model dir (with tokenizer) in paths.models/pretrain."""
    from ..data import data_fingerprint

    data = params.path("data")
    index = params.check_data(data)
    config = params.model_config(vocab_size=int(index["vocab_size"]))
    fingerprint = {"stage": "pretrain", "train": _train_fingerprint(params.pretrain), "model": config.to_diff_dict(),
                   "data": data_fingerprint(data)}
    metrics = _train(params, "pretrain", params.pretrain, config, params.path("pretrain_model"), fingerprint)
    return metrics


def stage_qat(params: PipelineParams) -> dict:
    """QAT: the pretrained model with INT4 group-wise fake quantization (straight-through estimator), trained
    with qat.train's settings, then converted to real packed integers and saved quantized."""
    from ..data import data_fingerprint
    from ..quant import quantize_
    from ..train import build_model

    data = params.path("data")
    params.check_data(data)
    source = params.path("pretrain_model")
    if not (source / "config.json").is_file():
        raise PipelineError(f"qat: no pretrained model in {source}; run the pretrain stage first")
    prepare, convert = params.qat.config("prepare"), params.qat.config("convert")
    fingerprint = {"stage": "qat", "train": _train_fingerprint(params.qat_train), "qat": prepare.to_dict(),
                   "data": data_fingerprint(data), "model": _file_digest(source)}
    model = build_model(source, params.qat_train.seed)
    model.config.use_quantization, model.config.quantization_bits = True, params.qat.bits
    quantize_(model, prepare)
    metrics = _train(params, "qat", params.qat_train, model, params.path("qat_model"), fingerprint,
                     finalize=lambda trained: quantize_(trained, convert))
    metrics.update({f"qat_{k}": v for k, v in prepare.to_dict().items() if k != "method"})
    return metrics


def _load_float_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise PipelineError(f"no model in {path}; run the pretrain stage first")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                local_files_only=True).eval()


def calibration_batches(params: PipelineParams) -> list:
    """`quantize.calibration.num_samples` training sequences (seeded choice) in batches of token ids (B, L)."""
    import numpy as np

    from ..data import PackedDataset

    c = params.quantize.calibration
    train = PackedDataset(params.path("data"), "train", seq_len=c.seq_len)
    n = min(c.num_samples, len(train))
    idx = np.sort(np.random.default_rng(c.seed).choice(len(train), size=n, replace=False))
    return [train.batch(idx[i:i + c.batch_size]) for i in range(0, n, c.batch_size)]


def stage_quantize(params: PipelineParams, method: str) -> dict:
    """One quantization method from the pretrained model (calibrated on training data for GPTQ/AWQ), saved
    quantized with its tokenizer in paths.models/quantized/<method>."""
    import torch

    from ..quant import layer_filter, quantize_, storage_summary

    started = time.monotonic()
    source = params.path("pretrain_model")
    params.check_data()
    config = params.quantize.config(method)
    layers = params.quantize.layers(method)
    model = _load_float_model(source)
    filter_fn = layer_filter(*layers) if layers else None
    quantize_(model, config, filter_fn)
    calibrated = params.quantize.method_type(method) in CALIBRATED
    if calibrated:
        # Calibrate on the GPU when there is one: GPTQ/AWQ run the whole model over the calibration set and
        # solve per-layer problems, hours on CPU for a few-hundred-million-parameter model.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        batches = calibration_batches(params)
        with torch.no_grad():
            for batch in batches:
                model(batch.to(device), use_cache=False)
        quantize_(model, dataclasses.replace(config, step="convert"))
        model.to("cpu")
    with staged_dir(params.path("quantized_model", method=method)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _copy_tokenizer(source, tmp)
    summary = storage_summary(model)
    return {"method": params.quantize.method_type(method), **_numeric(summary),
            "calibration_sequences": sum(len(b) for b in batches) if calibrated else 0,
            "elapsed_s": time.monotonic() - started}


def _copy_tokenizer(model_dir: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError):
        return  # a model saved without a tokenizer stays without one
    tokenizer.save_pretrained(out)


def stage_evaluate(params: PipelineParams, variant: str) -> dict:
    """One variant's metrics (EVAL's `evaluate_variant`), written to paths.eval/<variant>.json."""
    from .evaluation import evaluate_variant

    model_dir = params.path("model", variant=variant)
    if not (model_dir / "config.json").is_file():
        raise PipelineError(f"evaluate: no model for variant {variant!r} in {model_dir}; run its stage first")
    metrics = evaluate_variant(model_dir, params.path("data"), params.evaluate, variant=variant)
    write_json_atomic(params.path("eval", variant=variant), metrics)
    return metrics


def load_results(params: PipelineParams) -> list[dict]:
    """The evaluation results of the current variants, in `variants()` order (stale files are ignored)."""
    results, missing = [], []
    for variant in params.variants():
        path = params.path("eval", variant=variant)
        if path.is_file():
            results.append(json.loads(path.read_text(encoding="utf-8")))
        else:
            missing.append(variant)
    if missing:
        raise PipelineError(f"report: no evaluation results for {', '.join(missing)} in {params.path('eval_dir')}; "
                            "run their evaluate stages first")
    return results


def stage_report(params: PipelineParams) -> dict:
    """The comparison table (CSV, Markdown) and plots of all variants (EVAL's `write_report`)."""
    from .report import write_report

    results = load_results(params)
    files = write_report(results, params.path("reports"))
    metrics: dict = {"variants": len(results), "files": {k: os.fspath(v) for k, v in files.items()}}
    for r in results:
        metrics[r["variant"]] = _numeric(r)
    return metrics


def stage_export(params: PipelineParams, variant: str | None = None) -> dict:
    """Variants (one, or all when `variant` is None) as HF directories with a model card (EVAL's
    `export_model`) in paths.exports/<variant>. One DVC stage exports all: copying is cheap next to starting a
    process per variant."""
    from .export import export_model

    variants = [variant] if variant is not None else params.variants()
    missing = [v for v in variants if not params.path("eval", variant=v).is_file()]
    if missing:
        raise PipelineError(f"export: no evaluation of {', '.join(missing)} in {params.path('eval_dir')}; run "
                            "their evaluate stages first")
    metrics: dict = {}
    for v in variants:
        results = json.loads(params.path("eval", variant=v).read_text(encoding="utf-8"))
        target = params.path("export", variant=v)
        _remove_stale_temps(target)
        export_model(params.path("model", variant=v), target, variant=v, metrics=results, params=params.export,
                     tokenizer_dir=params.path("data") / "tokenizer", root=params.root)  # atomic replace
        metrics[f"{v}_export_bytes"] = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return metrics


# The entry point ---------------------------------------------------------------------------------------------
_STAGE_SECTIONS = {
    "tokenize": ("tokenize",), "pretrain": ("model", "pretrain"), "qat": ("qat",), "quantize": (),
    "evaluate": ("evaluate",), "report": (), "export": ("export",),
}


def stage_label(name: str, method: str | None = None, variant: str | None = None) -> str:
    """The DVC-style name of one stage instance: pretrain, quantize@gptq, evaluate@bf16."""
    key = method or variant
    return f"{name}@{key}" if key else name


def metrics_name(name: str, method: str | None = None, variant: str | None = None) -> str:
    key = method or variant
    return f"{name}_{key}" if key else name


def _logged_params(params: PipelineParams, name: str, method: str | None) -> dict:
    logged = {}
    for section in _STAGE_SECTIONS[name]:
        logged.update(_flatten(section, params.section(section)))
    if name == "qat":
        logged.update(_flatten("qat.train_effective", params.qat_train.to_dict()))
    if name == "quantize" and method is not None:
        logged.update(_flatten(f"quantize.methods.{method}", params.quantize.methods[method]))
        logged.update(_flatten("quantize.calibration", dataclasses.asdict(params.quantize.calibration)))
    return logged


def _tracking_run(label: str, logged: dict, params: PipelineParams, pipeline_id, tags):
    from .tracking import stage_run

    return stage_run(label, logged, settings=params.tracking, root=params.root, pipeline_id=pipeline_id, tags=tags)


DISTRIBUTED_STAGES = ("pretrain", "qat")


def run_stage(name: str, params: PipelineParams, *, method: str | None = None, variant: str | None = None,
              pipeline_id: str | None = None, tags: dict | None = None,
              execute: Callable[[], dict] | None = None) -> dict:
    """Run one stage (one method of quantize, one variant of evaluate/export) inside a tracking run; write
    metrics/<stage>[_<method|variant>].json atomically after the outputs are in place; return the metrics.

    Under torchrun (RANK set), pretrain and qat train on every process; only rank 0 tracks and writes outputs
    and metrics. `execute`, when given, does the stage's work instead (e.g. launches torchrun, whose rank 0 writes
    the outputs and the metrics file) and returns its metrics; the tracking run stays in this process.
    """
    if name not in STAGES:
        raise PipelineError(f"stage {name!r} does not exist; stages: {', '.join(STAGES)}")
    if name == "quantize":
        if method is None or variant is not None:
            raise PipelineError(f"quantize runs one method: pass method (one of {', '.join(params.quantize.methods)})")
        if method not in params.quantize.methods:
            raise PipelineError(f"quantize.methods: no method named {method!r}; valid: "
                                f"{', '.join(params.quantize.methods) or 'none'}")
    elif name == "export":
        if method is not None or (variant is not None and variant not in params.variants()):
            raise PipelineError(f"export takes a variant (one of {', '.join(params.variants())}) or none (all)")
    elif name == "evaluate":
        if variant is None or method is not None:
            raise PipelineError(f"{name} runs one variant: pass variant (one of {', '.join(params.variants())})")
        if variant not in params.variants():
            raise PipelineError(f"{name}: unknown variant {variant!r}; valid: {', '.join(params.variants())}")
    elif method is not None or variant is not None:
        raise PipelineError(f"{name} takes neither method nor variant")

    label = stage_label(name, method, variant)
    started = time.monotonic()
    rank, _ = _ranks()
    if rank != 0:
        if name not in DISTRIBUTED_STAGES:
            raise PipelineError(f"{name} runs in one process; only {' and '.join(DISTRIBUTED_STAGES)} run under "
                                f"torchrun (RANK={rank} is set)")
        return _SIMPLE[name](params)
    with _tracking_run(label, _logged_params(params, name, method), params, pipeline_id, tags) as run:
        if execute is not None:
            metrics = execute()
        elif name == "quantize":
            metrics = stage_quantize(params, method)
        elif name == "evaluate":
            metrics = stage_evaluate(params, variant)
        elif name == "export":
            metrics = stage_export(params, variant)
        else:
            metrics = _SIMPLE[name](params)
        metrics = {**metrics, "stage_seconds": time.monotonic() - started}
        write_json_atomic(params.path("metrics", name=metrics_name(name, method, variant)), metrics)
        run.log_metrics(_numeric(metrics))
    logger.info("%s: done in %.1f s", label, metrics["stage_seconds"])
    return metrics


_SIMPLE = {"tokenize": stage_tokenize, "pretrain": stage_pretrain, "qat": stage_qat, "report": stage_report}
