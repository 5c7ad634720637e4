"""`pretrain`: the training loop (pretraining, fine-tuning) on packed token shards, built on `accelerate`.

One optimizer step:
    sequences = the step's slice of a fixed per-epoch permutation (so the data position is the step number)
    for each of the A micro-batches:   loss = Σ token NLL / (tokens of the whole step)   → backward
    non-finite loss or gradient norm?  → stop (or skip the step), never save
    clip the global gradient norm; AdamW step; warmup + cosine schedule step

Everything a resumed run needs (weights, AdamW moments, scheduler, RNG, step) is in each checkpoint, and the
data order is a pure function of (seed, step): on CPU a run interrupted and resumed ends bitwise equal to an
uninterrupted one.

Several processes (torchrun / accelerate launch) train data-parallel with DDP or FSDP2 (`params.distributed`,
see `distributed.py`); rank r of W takes the slice [(m·W + r)·B, +B) of the step's global batch for micro-batch
m, and checkpoints are consolidated, so a run resumes on another number of processes with the same global batch.
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
from . import distributed as dist_utils
from .checkpoint import (
    checkpoint_name,
    find_latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    read_optimizer_state,
    read_trainer_state,
    remove_stale_temp_dirs,
    restore_rng,
    rotate_checkpoints,
    save_checkpoint,
)
from .evaluate import evaluate, unigram_perplexity
from .optim import build_optimizer, build_scheduler, resize_token_embeddings
from .params import TrainConfigError, TrainParams
from .signature import model_signature, run_signature, signature_changes

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
    global_batch = params.batch_size * params.accumulation_steps(num_processes) * num_processes
    if global_batch > len(train_set):
        raise TrainConfigError(
            f"batch_size × gradient_accumulation_steps × processes = {global_batch} sequences per step, but the "
            f"training split has only {len(train_set)} sequences of {seq_len} tokens: lower batch_size or "
            "gradient_accumulation_steps, or use more data")
    return train_set, valid_set


def check_resume(params: TrainParams, model_or_config, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 num_processes: int = 1) -> tuple[Path | None, dict | None]:
    """The checkpoint a run would resume from (newest complete one, or None) and its trainer state, after
    checking that it belongs to this run: same model architecture (preset/config), same data, schedule and
    global batch. Needs no model weights, so a launcher can call it before holding GPUs.
    Raises `TrainConfigError` naming each changed field."""
    if not params.resume or find_latest_checkpoint(Path(out_dir) / CHECKPOINT_DIR) is None:
        return None, None
    train_set, _ = check_train_inputs(params, model_or_config, data_dir, num_processes)
    return _resume_point(params, model_or_config, data_dir, out_dir, _plan(params, train_set, num_processes, data_dir))


def _resume_point(params: TrainParams, model_or_config, data_dir, out_dir,
                  plan: dict) -> tuple[Path | None, dict | None]:
    if not params.resume:
        return None, None
    latest = find_latest_checkpoint(Path(out_dir) / CHECKPOINT_DIR)
    if latest is None:
        return None, None
    state = read_trainer_state(latest)
    saved_model = state.get("model_config")
    if saved_model is not None:
        index = read_index(data_dir)
        config = model_config(model_or_config)
        vocab = max(config.vocab_size, int(index["vocab_size"])) if params.resize_token_embeddings else None
        expected = model_signature(config, vocab)
        diff = [f"{k}: {saved_model.get(k)!r} (checkpoint) ≠ {v!r} (this run)" for k, v in expected.items()
                if k in saved_model and saved_model[k] != v]
        if diff:
            raise TrainConfigError(
                f"cannot resume from {latest}: it was written for a different model (another preset or config): "
                f"{'; '.join(diff)}; train the same config, use a new output directory, or resume=False")
    changes = signature_changes(state["run"], plan["signature"])
    if changes is not None:
        raise TrainConfigError(f"cannot resume from {latest}: the run changed {changes}; use a new output "
                               "directory, or resume=False to start over")
    return latest, state


def _plan(params: TrainParams, train_set: PackedDataset, world: int, data_dir) -> dict:
    """Accumulation steps, global batch, sampler, schedule length and run signature of a run on `world`."""
    A = params.accumulation_steps(world)
    global_batch = params.batch_size * A * world
    sampler = StepSampler(len(train_set), global_batch, params.seed)
    total_steps = params.max_steps or max(1, math.ceil(params.num_epochs * sampler.steps_per_epoch))
    warmup = params.warmup_steps if params.warmup_steps is not None else round(params.warmup_ratio * total_steps)
    warmup = min(warmup, total_steps - 1) if total_steps > 1 else 0
    signature = run_signature(params, train_set.seq_len, world, total_steps, warmup, data_fingerprint(data_dir))
    return {"accumulation": A, "global_batch": global_batch, "sampler": sampler, "total_steps": total_steps,
            "warmup": warmup, "signature": signature}


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
    mixed_precision = _resolve_mixed_precision(params.mixed_precision)
    accelerator = Accelerator(mixed_precision=mixed_precision, step_scheduler_with_optimizer=False,
                              cpu=dist_utils.cpu_only_launch())
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    strategy = dist_utils.resolve_strategy(params.distributed, world)
    fsdp = strategy == "fsdp2"
    train_set, valid_set = check_train_inputs(params, model_or_config, data_dir, world)
    index = read_index(data_dir)
    plan = _plan(params, train_set, world, data_dir)
    A, B = plan["accumulation"], params.batch_size
    global_batch, sampler = plan["global_batch"], plan["sampler"]
    total_steps, warmup, signature = plan["total_steps"], plan["warmup"], plan["signature"]
    if tokenizer_dir is None and index.get("tokenizer"):
        tokenizer_dir = data_dir / index["tokenizer"]
    ckpt_root = out_dir / CHECKPOINT_DIR
    if is_main:
        remove_stale_temp_dirs(ckpt_root)
    # Checked before any weights are built: a checkpoint of another model or run fails here.
    try:
        latest, state = _resume_point(params, model_or_config, data_dir, out_dir, plan)
        problem = None
    except TrainConfigError as exc:
        latest, state, problem = None, None, str(exc)
    if world > 1:  # every rank must resume from the same step, and fail together (a lone raise would hang the rest)
        from accelerate.utils import gather_object

        seen = gather_object([(latest.name if latest is not None else None, problem)])
        problem = next((p for _, p in seen if p), None)
        if problem is None and len({name for name, _ in seen}) > 1:
            problem = (f"the {world} processes see different checkpoints in {ckpt_root} (by rank: "
                       f"{[name for name, _ in seen]}): on several machines, put the output/checkpoint directory "
                       "on storage they all share, or remove the checkpoints to start over")
    if problem is not None:
        raise TrainConfigError(problem)
    accelerator.wait_for_everyone()

    from transformers import PreTrainedModel

    # FSDP2 on several processes: only rank 0 builds (or loads) the real model; the others build it on the meta
    # device and receive their shards from rank 0 after sharding.
    lean = fsdp and world > 1 and not is_main and not isinstance(model_or_config, PreTrainedModel)
    model = dist_utils.meta_model(model_or_config) if lean else build_model(model_or_config, params.seed)
    if int(index["vocab_size"]) > model.config.vocab_size:
        resize_token_embeddings(model, int(index["vocab_size"]))
    if params.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    skeleton = None
    if fsdp:
        # Rank 0 loads the consolidated checkpoint's weights before sharding and broadcasts them; the optimizer
        # is built on the sharded parameters and the checkpoint's full optimizer state scattered into it.
        if latest is not None and is_main:
            load_model_weights(latest, model)
        model.train()
        full_state = model.state_dict() if is_main and world > 1 else None
        skeleton = dist_utils.structure_copy(model) if is_main else None
        dist_utils.apply_fsdp2(model, accelerator.device, mixed_precision)
        if world > 1:
            dist_utils.broadcast_from_rank0(model, full_state, accelerator.device)
        del full_state
        optimizer = build_optimizer(model, params)
        scheduler = build_scheduler(optimizer, warmup, total_steps, params.min_lr_ratio)
        if latest is not None:
            dist_utils.load_full_optimizer_state(model, optimizer, read_optimizer_state(latest, state))
            scheduler.load_state_dict(state["scheduler"])
            restore_rng(latest, state)
    else:
        model.to(accelerator.device).train()
        optimizer = build_optimizer(model, params)
        scheduler = build_scheduler(optimizer, warmup, total_steps, params.min_lr_ratio)
        if latest is not None:
            state = load_checkpoint(latest, model, optimizer, scheduler)
    step, last_checkpoint, resumed_from = 0, None, None
    resumed_loss, resumed_eval = None, {}
    if latest is not None:
        step, last_checkpoint, resumed_from = int(state["step"]), latest, int(state["step"])
        resumed_loss, resumed_eval = state.get("train_loss"), state.get("last_eval") or {}
        logger.info("resumed from %s (step %d of %d)", latest, step, total_steps)
    arch = model_signature(model.config)
    unigram_ppl = unigram_perplexity(train_set, valid_set) if valid_set is not None and is_main else None
    if not fsdp:
        model = accelerator.prepare(model)
    unwrapped = accelerator.unwrap_model(model)
    if strategy != "no":
        logger.info("data-parallel %s over %d processes: global batch %d = %d × %d micro-batches × %d", strategy,
                    world, global_batch, B, A, world)

    seq_len = train_set.seq_len
    tokens_per_step = global_batch * seq_len
    targets_per_step = global_batch * (seq_len - 1)  # every position of a packed sequence counts
    eval_bs = params.eval_batch_size or B
    history: list[dict] = []
    last_eval: dict = resumed_eval
    train_loss = resumed_loss  # None until a step is taken (JSON has no NaN)
    skipped, consecutive_skips, train_time, steps_run = 0, 0, 0.0, 0
    stopped_early = False
    forward_context = accelerator.autocast if fsdp else contextlib.nullcontext  # prepare() adds it otherwise

    def checkpoint(at_step: int) -> Path:
        model_state = optimizer_state = None
        if fsdp:  # a collective: every rank sends its shards to rank 0
            model_state, optimizer_state = dist_utils.full_state_dicts(model, optimizer)
        if is_main:
            finite = (all(bool(torch.isfinite(t).all()) for t in model_state["state"].values()) if fsdp
                      else _all_finite(unwrapped))
            if not finite:
                raise NonFiniteLossError(
                    f"non-finite weights at step {at_step}: not saving a checkpoint; last good checkpoint: "
                    f"{last_checkpoint or 'none'}", at_step, last_checkpoint)
            epoch, in_epoch = sampler.position(at_step)
            save_checkpoint(ckpt_root, at_step, None if fsdp else unwrapped, optimizer, scheduler, {
                "run": signature, "epoch": epoch, "step_in_epoch": in_epoch,
                "tokens_seen": at_step * tokens_per_step, "last_eval": last_eval, "train_loss": train_loss,
                "params": params.to_dict(), "model_config": arch, "distributed": strategy},
                model_state=model_state, optimizer_state=optimizer_state)
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
                with dist_utils.no_grad_sync(model, accelerator, m == A - 1):
                    with forward_context():
                        out = model(input_ids=x, labels=x, num_items_in_batch=targets_per_step, use_cache=False)
                    # DDP and FSDP2 average gradients over processes; the loss is already divided by the global
                    # token count, so scale back up to get the exact global mean.
                    accelerator.backward(out.loss * world)
                loss_sum += out.loss.detach()
            if world > 1:
                loss_sum = accelerator.reduce(loss_sum, "sum")
            if fsdp:
                grad_norm = dist_utils.clip_grad_norm(model, params.max_grad_norm or math.inf)
            else:
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
                last_eval = {"step": step, **evaluate(model, valid_set, eval_bs, params.eval_batches, accelerator,
                                                      lockstep=fsdp)}
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

    peak_gib = None
    if accelerator.device.type == "cuda":  # training's peak (before the final evaluation), every rank's
        peak_gib = [torch.cuda.max_memory_allocated(accelerator.device) / 2**30]
        if world > 1:
            from accelerate.utils import gather_object

            peak_gib = gather_object(peak_gib)
    metrics: dict = {"completed": not stopped_early, "step": step, "total_steps": total_steps,
                     "train_loss": train_loss, "tokens_seen": step * tokens_per_step,
                     "tokens_per_second": steps_run * tokens_per_step / train_time if train_time else 0.0,
                     "skipped_steps": skipped, "resumed_from_step": resumed_from,
                     "num_parameters": sum(p.numel() for p in unwrapped.parameters()),
                     "mixed_precision": accelerator.mixed_precision, "num_processes": world, "distributed": strategy,
                     "global_batch": global_batch}
    if peak_gib is not None:
        metrics["peak_mem_gib_per_rank"] = peak_gib
    if unigram_ppl is not None:
        metrics["valid_unigram_ppl"] = unigram_ppl
    if not stopped_early:
        if valid_set is not None:
            last_eval = {"step": step, **evaluate(model, valid_set, eval_bs, params.eval_batches, accelerator,
                                                  lockstep=fsdp)}
            history.append(last_eval)
        metrics.update({k: v for k, v in last_eval.items() if k != "step"})
        if fsdp:  # gather the full weights into rank 0's plain (unsharded) copy of the model
            model_state = dist_utils.full_model_state(model)
            unwrapped = dist_utils.materialize(skeleton, model_state) if is_main else None
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

