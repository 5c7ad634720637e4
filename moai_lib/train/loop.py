"""`pretrain`: the training loop (pretraining, fine-tuning) on packed token shards, built on `accelerate`.

One optimizer step:
    sequences = the step's slice of a fixed per-epoch permutation (so the data position is the step number)
    for each of the A micro-batches:   loss = Σ token NLL / (tokens of the whole step)   → backward
    non-finite loss or gradient norm?  → stop (or skip the step), never save
    clip the global gradient norm; AdamW step; warmup + cosine schedule step

Everything a resumed run needs (weights, AdamW moments, scheduler, RNG, step) is in each checkpoint, and the
data order is a pure function of (seed, step): on CPU a run interrupted and resumed ends bitwise equal to an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data.shards import PackedDataset, data_fingerprint, read_index
from ..data.tokenizer import fsync_dir, make_temp_dir, replace_dir
from .checkpoint import (
    checkpoint_name,
    find_latest_checkpoint,
    load_checkpoint,
    remove_stale_temp_dirs,
    rotate_checkpoints,
    save_checkpoint,
)
from .evaluate import evaluate, unigram_perplexity
from .optim import build_optimizer, build_scheduler, resize_token_embeddings
from .params import TrainConfigError, TrainParams

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"
METRICS_FILE = "metrics.json"


class NonFiniteLossError(RuntimeError):
    """Training met a NaN/Inf loss or gradient; `step` and `last_checkpoint` say where to pick up."""

    def __init__(self, message: str, step: int, last_checkpoint: Path | None):
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


class StepSampler:
    """Sequence indices of each optimizer step: epoch e uses the permutation seeded by (seed, e), consumed
    `global_batch` at a time; the incomplete tail of an epoch is not used."""

    def __init__(self, num_sequences: int, global_batch: int, seed: int):
        self.num_sequences, self.global_batch, self.seed = num_sequences, global_batch, seed
        self.steps_per_epoch = num_sequences // global_batch
        self._epoch, self._perm = None, None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of optimizer step `step`."""
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int) -> np.ndarray:
        epoch, k = self.position(step)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
        return self._perm[k * self.global_batch:(k + 1) * self.global_batch]


def _resolve_mixed_precision(choice: str) -> str:
    if choice == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return choice


def model_config(model_or_config):
    """The config of what `pretrain` will train (a config, a model, or a model directory), without building
    the model: inputs are checked against it first."""
    from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

    if isinstance(model_or_config, PreTrainedModel):
        return model_or_config.config
    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config
    path = Path(model_or_config)
    if not (path / "config.json").is_file():
        raise TrainConfigError(f"model_path {os.fspath(path)!r} has no config.json" if path.is_dir()
                               else f"model_path {os.fspath(path)!r} does not exist")
    if not any(path.glob("*.safetensors")):
        raise TrainConfigError(f"model_path {os.fspath(path)!r} has no *.safetensors weights; only safetensors "
                               "checkpoints are loaded (re-save with save_pretrained)")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def build_model(model_or_config, seed: int):
    """A model instance as is; a config → a fresh fp32 model initialised under `seed`; a directory → fp32
    `from_pretrained` (safetensors only, local files only)."""
    from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

    if isinstance(model_or_config, PreTrainedModel):
        return model_or_config
    if isinstance(model_or_config, PretrainedConfig):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(model_or_config, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_or_config, dtype=torch.float32, use_safetensors=True,
                                                local_files_only=True)


def check_train_inputs(params: TrainParams, model_or_config, data_dir: str | os.PathLike,
                       num_processes: int = 1) -> tuple[PackedDataset, PackedDataset | None]:
    """Every check that needs no model weights: data directory and shards, sequence length against
    max_position_embeddings, tokenizer vocabulary against the model's, batch against the data.
    Returns the (train, valid) datasets. Raises `TrainConfigError` / `DataError`."""
    index = read_index(data_dir)
    train_set = PackedDataset(data_dir, "train", seq_len=params.max_length)
    valid_set = PackedDataset(data_dir, "valid", seq_len=params.max_length) if "valid" in index["splits"] else None
    config = model_config(model_or_config)
    seq_len = train_set.seq_len
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise TrainConfigError(f"sequence length {seq_len} (block_size/max_length) exceeds the model's "
                               f"max_position_embeddings {max_pos}: use a smaller max_length or block_size")
    data_vocab = int(index["vocab_size"])
    if data_vocab > config.vocab_size and not params.resize_token_embeddings:
        raise TrainConfigError(f"the data's tokenizer has {data_vocab} tokens but the model's vocab_size is "
                               f"{config.vocab_size}: use a model with a large enough vocabulary, or set "
                               "resize_token_embeddings to grow it")
    global_batch = params.batch_size * params.gradient_accumulation_steps * num_processes
    if global_batch > len(train_set):
        raise TrainConfigError(
            f"batch_size × gradient_accumulation_steps × processes = {global_batch} sequences per step, but the "
            f"training split has only {len(train_set)} sequences of {seq_len} tokens: lower batch_size or "
            "gradient_accumulation_steps, or use more data")
    return train_set, valid_set


def _run_signature(params: TrainParams, seq_len: int, num_processes: int, total_steps: int, warmup: int,
                   fingerprint: str) -> dict:
    """What must not change between a checkpoint and the run that resumes it."""
    return {"batch_size": params.batch_size, "gradient_accumulation_steps": params.gradient_accumulation_steps,
            "num_processes": num_processes, "seq_len": seq_len, "seed": params.seed, "total_steps": total_steps,
            "warmup_steps": warmup, "learning_rate": params.learning_rate, "min_lr_ratio": params.min_lr_ratio,
            "weight_decay": params.weight_decay, "data_fingerprint": fingerprint}


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM (preemption) sets a flag; the loop checkpoints at the next step boundary and returns."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def pretrain(
    params: TrainParams,
    model_or_config,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    stop_after_step: int | None = None,
    finalize_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> dict:
    """Train a causal LM on the packed shards in `data_dir` and save it to ``out_dir/model``.

    Args:
        params: `TrainParams`.
        model_or_config: a config (a fresh model, initialised with ``params.seed``), a model instance (e.g.
            one prepared for QAT), or a model directory (fine-tuning; safetensors only).
        data_dir: written by `write_shards` / `moai tokenize`: splits ``train`` and (optional) ``valid``.
        out_dir: receives ``checkpoints/step-NNNNNNNN/``, the final ``model/`` (safetensors, config, tokenizer)
            and ``metrics.json``.
        tokenizer_dir: tokenizer to save with the model (default: ``data_dir/tokenizer`` when present).
        stop_after_step: stop after this optimizer step as if interrupted (checkpoint, no final model).
        finalize_model: applied to the trained model before the final save (e.g. QAT's convert step).

    Returns metrics: final train loss, validation loss/perplexity overall and per language, the unigram
    perplexity baseline, tokens seen, tokens/s, steps, and whether the run completed.

    Raises:
        TrainConfigError / DataError: bad inputs, before any training.
        NonFiniteLossError: a NaN/Inf loss or gradient (with nan_policy "stop"); nothing non-finite is saved.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    started = time.monotonic()
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    accelerator = Accelerator(mixed_precision=_resolve_mixed_precision(params.mixed_precision),
                              step_scheduler_with_optimizer=False)
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    train_set, valid_set = check_train_inputs(params, model_or_config, data_dir, world)
    index = read_index(data_dir)
    A, B = params.gradient_accumulation_steps, params.batch_size
    global_batch = B * A * world
    sampler = StepSampler(len(train_set), global_batch, params.seed)
    total_steps = params.max_steps or max(1, math.ceil(params.num_epochs * sampler.steps_per_epoch))
    warmup = params.warmup_steps if params.warmup_steps is not None else round(params.warmup_ratio * total_steps)
    warmup = min(warmup, total_steps - 1) if total_steps > 1 else 0
    signature = _run_signature(params, train_set.seq_len, world, total_steps, warmup, data_fingerprint(data_dir))
    if tokenizer_dir is None and index.get("tokenizer"):
        tokenizer_dir = data_dir / index["tokenizer"]

    model = build_model(model_or_config, params.seed)
    if int(index["vocab_size"]) > model.config.vocab_size:
        resize_token_embeddings(model, int(index["vocab_size"]))
    if params.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.to(accelerator.device).train()
    optimizer = build_optimizer(model, params)
    scheduler = build_scheduler(optimizer, warmup, total_steps, params.min_lr_ratio)

    ckpt_root = out_dir / CHECKPOINT_DIR
    step, last_checkpoint, resumed_from = 0, None, None
    resumed_loss, resumed_eval = None, {}
    if is_main:
        remove_stale_temp_dirs(ckpt_root)
    if params.resume:
        latest = find_latest_checkpoint(ckpt_root)
        if latest is not None:
            state = load_checkpoint(latest, model, optimizer, scheduler)
            diff = {k: (state["run"].get(k), v) for k, v in signature.items() if state["run"].get(k) != v}
            if diff:
                changes = "; ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in diff.items())
                raise TrainConfigError(f"cannot resume from {latest}: the run changed ({changes}); use a new "
                                       "output directory, or resume=False to start over")
            step, last_checkpoint, resumed_from = int(state["step"]), latest, int(state["step"])
            resumed_loss, resumed_eval = state.get("train_loss"), state.get("last_eval") or {}
            logger.info("resumed from %s (step %d of %d)", latest, step, total_steps)
    unigram_ppl = unigram_perplexity(train_set, valid_set) if valid_set is not None and is_main else None
    model = accelerator.prepare(model)
    unwrapped = accelerator.unwrap_model(model)

    seq_len = train_set.seq_len
    tokens_per_step = global_batch * seq_len
    targets_per_step = global_batch * (seq_len - 1)  # every position of a packed sequence counts
    eval_bs = params.eval_batch_size or B
    history: list[dict] = []
    last_eval: dict = resumed_eval
    train_loss = resumed_loss  # None until a step is taken (JSON has no NaN)
    skipped, consecutive_skips, train_time, steps_run = 0, 0, 0.0, 0
    stopped_early = False

    def checkpoint(at_step: int) -> Path:
        if is_main:
            if not _all_finite(unwrapped):
                raise NonFiniteLossError(
                    f"non-finite weights at step {at_step}: not saving a checkpoint; last good checkpoint: "
                    f"{last_checkpoint or 'none'}", at_step, last_checkpoint)
            epoch, in_epoch = sampler.position(at_step)
            save_checkpoint(ckpt_root, at_step, unwrapped, optimizer, scheduler, {
                "run": signature, "epoch": epoch, "step_in_epoch": in_epoch,
                "tokens_seen": at_step * tokens_per_step, "last_eval": last_eval, "train_loss": train_loss,
                "params": params.to_dict()})
            rotate_checkpoints(ckpt_root, params.keep_checkpoints)
        accelerator.wait_for_everyone()
        return ckpt_root / checkpoint_name(at_step)

    bar = tqdm(total=total_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not (params.progress and is_main))
    with _stop_on_sigterm() as sigterm:
        while step < total_steps:
            t0 = time.perf_counter()
            idx = sampler.indices(step)
            loss_sum = torch.zeros((), device=accelerator.device)
            for m in range(A):
                start = (m * world + rank) * B
                x = train_set.batch(idx[start:start + B]).to(accelerator.device, non_blocking=True)
                sync = contextlib.nullcontext() if m == A - 1 else accelerator.no_sync(model)
                with sync:
                    out = model(input_ids=x, labels=x, num_items_in_batch=targets_per_step, use_cache=False)
                    # DDP averages gradients over processes; the loss is already divided by the global token
                    # count, so scale back up to get the exact global mean.
                    accelerator.backward(out.loss * world)
                loss_sum += out.loss.detach()
            if world > 1:
                loss_sum = accelerator.reduce(loss_sum, "sum")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), params.max_grad_norm or math.inf)
            step_loss, norm = float(loss_sum), float(grad_norm)
            if not (math.isfinite(step_loss) and math.isfinite(norm)):
                what = f"loss {step_loss}" if not math.isfinite(step_loss) else f"gradient norm {norm}"
                if params.nan_policy == "stop":
                    bar.close()
                    raise NonFiniteLossError(
                        f"non-finite {what} at step {step + 1}; training stopped before the update, nothing saved; "
                        f"last good checkpoint: {last_checkpoint or 'none'}", step + 1, last_checkpoint)
                skipped += 1
                consecutive_skips += 1
                optimizer.zero_grad(set_to_none=True)
                logger.warning("skipping step %d: non-finite %s", step + 1, what)
                if consecutive_skips >= params.max_skipped_steps:
                    bar.close()
                    raise NonFiniteLossError(
                        f"{consecutive_skips} consecutive non-finite steps up to step {step + 1}; training stopped; "
                        f"last good checkpoint: {last_checkpoint or 'none'}", step + 1, last_checkpoint)
            else:
                consecutive_skips = 0
                optimizer.step()
                train_loss = step_loss
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_run += 1
            train_time += time.perf_counter() - t0
            tok_s = steps_run * tokens_per_step / max(train_time, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", tok_s=f"{tok_s:,.0f}")
            if step % params.log_every == 0 or step == total_steps:
                history.append({"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                                "grad_norm": norm})
                logger.info("step %d/%d loss %.4f grad_norm %.3f lr %.3g %.0f tok/s", step, total_steps,
                            step_loss, norm, scheduler.get_last_lr()[0], tok_s)
            if valid_set is not None and params.eval_every and step % params.eval_every == 0 and step < total_steps:
                last_eval = {"step": step, **evaluate(model, valid_set, eval_bs, params.eval_batches, accelerator)}
                history.append(last_eval)
                logger.info("step %d: val_loss %.4f val_ppl %.2f", step, last_eval["val_loss"], last_eval["val_ppl"])
            out_of_time = params.time_budget_s is not None and time.monotonic() - started > params.time_budget_s
            interrupted = (stop_after_step is not None and step >= stop_after_step) or sigterm.is_set() or out_of_time
            if (params.save_every and step % params.save_every == 0) or (interrupted and step < total_steps):
                last_checkpoint = checkpoint(step)
            if interrupted and step < total_steps:
                stopped_early = True
                logger.info("stopping at step %d of %d (%s); run again to resume from %s", step, total_steps,
                            "SIGTERM" if sigterm.is_set() else "time budget" if out_of_time else "stop_after_step",
                            last_checkpoint)
                break
    bar.close()

    metrics: dict = {"completed": not stopped_early, "step": step, "total_steps": total_steps,
                     "train_loss": train_loss, "tokens_seen": step * tokens_per_step,
                     "tokens_per_second": steps_run * tokens_per_step / train_time if train_time else 0.0,
                     "skipped_steps": skipped, "resumed_from_step": resumed_from,
                     "num_parameters": sum(p.numel() for p in unwrapped.parameters()),
                     "mixed_precision": accelerator.mixed_precision, "num_processes": world}
    if unigram_ppl is not None:
        metrics["valid_unigram_ppl"] = unigram_ppl
    if not stopped_early:
        if valid_set is not None:
            last_eval = {"step": step, **evaluate(model, valid_set, eval_bs, params.eval_batches, accelerator)}
            history.append(last_eval)
        metrics.update({k: v for k, v in last_eval.items() if k != "step"})
        if is_main:
            if not _all_finite(unwrapped):
                raise NonFiniteLossError(f"non-finite weights after step {step}: the final model is not saved; "
                                         f"last good checkpoint: {last_checkpoint or 'none'}", step, last_checkpoint)
            final = finalize_model(unwrapped) if finalize_model is not None else unwrapped
            metrics["model_dir"] = str(_save_final_model(final, out_dir / MODEL_DIR, tokenizer_dir))
    metrics["elapsed_s"] = time.monotonic() - started
    metrics["history"] = history
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(out_dir / METRICS_FILE, metrics)
    accelerator.wait_for_everyone()
    return metrics


def _save_final_model(model, target: Path, tokenizer_dir) -> Path:
    """save_pretrained (safetensors) + the tokenizer, into a temporary directory renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True).save_pretrained(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

