"""`TrainParams`: every knob of `pretrain`, validated on construction."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import MoaiError, check_integer


class TrainConfigError(MoaiError, ValueError):
    """Invalid training parameters or inputs; the message names the parameter and what would be valid."""


MIXED_PRECISION = ("auto", "no", "bf16")
DISTRIBUTED = ("auto", "no", "ddp", "fsdp2")
NAN_POLICIES = ("stop", "skip")


@dataclass
class TrainParams:
    """Parameters of `pretrain` (pretraining, fine-tuning and, with a QAT-prepared model, QAT).

    Args:
        batch_size: sequences per micro-batch on each device.
        gradient_accumulation_steps: micro-batches per optimizer step; the loss is the exact mean over all
            tokens of the step (the model gets `num_items_in_batch`), not a mean of micro-batch means.
        global_batch_size: sequences per optimizer step over all processes; when set, gradient_accumulation_steps
            is derived as global_batch_size / (batch_size × world size), which must divide exactly. The global
            batch is what a resumed run must keep: with it fixed, a run may resume on a different number of GPUs.
        distributed: "auto" (env MOAI_DISTRIBUTED if set, else "ddp" with several processes, "no" with one),
            "no", "ddp" (DistributedDataParallel through accelerate) or "fsdp2" (`fully_shard` per Mamba layer:
            weights, gradients and AdamW states sharded over the processes). Launch with torchrun or
            `accelerate launch`; see `moai_lib.train.distributed`.
        num_epochs: passes over the training blocks (fractions allowed); ignored when `max_steps` is set.
        max_steps: optimizer steps of the whole run; it also sets the length of the cosine schedule.
        learning_rate: peak learning rate of AdamW.
        min_lr_ratio: the cosine ends at learning_rate · min_lr_ratio.
        warmup_steps: linear warmup steps; None → warmup_ratio of the total steps.
        warmup_ratio: see warmup_steps.
        weight_decay: AdamW decoupled weight decay, not applied to A_log, D, norms and biases (by name).
        adam_beta1, adam_beta2, adam_eps: AdamW constants (β2 = 0.95 as in the Mamba and GPT-3 recipes).
        max_grad_norm: clip the global gradient norm to this; None or 0 disables clipping (the norm is still
            computed, for the non-finite guard).
        max_length: tokens per training sequence; must divide the shards' block size (None: the block size).
        gradient_checkpointing: recompute each layer's activations in the backward (less memory, ~30% slower).
        mixed_precision: "auto" (bf16 autocast on a GPU that supports it, fp32 on CPU), "no", or "bf16".
        eval_every: validate every this many steps (0: only at the end).
        eval_batches: validate on at most this many batches, spread evenly over the split (None: all of it).
        eval_batch_size: batch size of validation (None: batch_size).
        save_every: write a checkpoint every this many steps (0: none, except on an early stop).
        keep_checkpoints: complete checkpoints kept (older ones are deleted after a newer one is complete).
        resume: continue from the newest complete checkpoint in `out_dir/checkpoints` when there is one.
        nan_policy: on a non-finite loss or gradient, "stop" (raise `NonFiniteLossError`) or "skip" the step.
        max_skipped_steps: with nan_policy "skip", stop after this many consecutive skipped steps.
        seed: seeds the model initialisation and the data order (a fixed permutation per epoch).
        log_every: log the training loss every this many steps.
        progress: show a progress bar (tqdm) on the main process.
        time_budget_s: stop cleanly (checkpoint, no final model) after this many seconds of this invocation,
            so a long run can be sliced into jobs with a wall-clock limit; run again to continue.
        resize_token_embeddings: when the tokenizer has more tokens than the model (added domain tokens),
            grow the embeddings instead of failing.
    """

    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None
    distributed: str = "auto"
    num_epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    warmup_ratio: float = 0.02
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    max_length: int | None = None
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    eval_every: int = 0
    eval_batches: int | None = None
    eval_batch_size: int | None = None
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = True
    nan_policy: str = "stop"
    max_skipped_steps: int = 10
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    time_budget_s: float | None = None
    resize_token_embeddings: bool = False

    def __post_init__(self):
        def integer(name: str, minimum: int, optional: bool = False) -> None:
            check_integer(getattr(self, name), name, minimum, TrainConfigError, optional=optional)

        def number(name: str, low: float, high: float = math.inf, low_open: bool = False,
                   optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > low if low_open else value >= low) and value <= high
            if not ok:
                bound = f"{'>' if low_open else '≥'} {low}" + (f" and ≤ {high}" if high != math.inf else "")
                raise TrainConfigError(f"{name} must be a finite number {bound}, got {value!r}")

        integer("batch_size", 1)
        integer("gradient_accumulation_steps", 1)
        integer("global_batch_size", 1, optional=True)
        number("num_epochs", 0, low_open=True)
        integer("max_steps", 1, optional=True)
        number("learning_rate", 0, low_open=True)
        number("min_lr_ratio", 0, 1)
        integer("warmup_steps", 0, optional=True)
        number("warmup_ratio", 0, 1)
        number("weight_decay", 0)
        number("adam_beta1", 0, 1)
        number("adam_beta2", 0, 1)
        number("adam_eps", 0, low_open=True)
        number("max_grad_norm", 0, optional=True)
        integer("max_length", 2, optional=True)
        integer("eval_every", 0)
        integer("eval_batches", 1, optional=True)
        integer("eval_batch_size", 1, optional=True)
        integer("save_every", 0)
        integer("keep_checkpoints", 1)
        integer("max_skipped_steps", 1)
        integer("seed", 0)
        integer("log_every", 1)
        number("time_budget_s", 0, low_open=True, optional=True)
        if self.adam_beta1 >= 1 or self.adam_beta2 >= 1:
            raise TrainConfigError(f"adam betas must be < 1, got ({self.adam_beta1}, {self.adam_beta2})")
        if self.mixed_precision not in MIXED_PRECISION:
            raise TrainConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                                   f"got {self.mixed_precision!r}")
        if self.distributed not in DISTRIBUTED:
            raise TrainConfigError(f"distributed must be one of {', '.join(DISTRIBUTED)}, got {self.distributed!r}")
        if self.global_batch_size is not None and self.global_batch_size % self.batch_size:
            raise TrainConfigError(f"global_batch_size {self.global_batch_size} must be a multiple of batch_size "
                                   f"{self.batch_size} (× the number of processes)")
        if self.nan_policy not in NAN_POLICIES:
            raise TrainConfigError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {self.nan_policy!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> TrainParams:
        """Build from a mapping (e.g. one stage of a params file); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"unknown training parameter(s) {', '.join(unknown)}; valid: "
                                   f"{', '.join(sorted(known))}")
        return cls(**{**data, **overrides})

    def accumulation_steps(self, num_processes: int) -> int:
        """Micro-batches per optimizer step on `num_processes` processes (see `global_batch_size`)."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        per_micro = self.batch_size * num_processes
        if self.global_batch_size % per_micro:
            raise TrainConfigError(
                f"global_batch_size {self.global_batch_size} is not divisible by batch_size {self.batch_size} × "
                f"world size {num_processes} = {per_micro}: choose a number of processes (GPUs) or a batch_size "
                f"such that batch_size × processes divides {self.global_batch_size}")
        steps = self.global_batch_size // per_micro
        if self.gradient_accumulation_steps not in (1, steps):
            raise TrainConfigError(
                f"gradient_accumulation_steps {self.gradient_accumulation_steps} contradicts global_batch_size "
                f"{self.global_batch_size} = batch_size {self.batch_size} × world size {num_processes} × {steps}: "
                "set only one of them")
        return steps

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides: Any) -> TrainParams:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise TrainConfigError(f"params file {os.fspath(path)!r} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TrainConfigError(f"{os.fspath(path)}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{os.fspath(path)}: expected a JSON object of training parameters")
        return cls.from_dict(data, **overrides)
