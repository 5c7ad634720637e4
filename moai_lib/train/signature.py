"""What a checkpoint records about its run and model, and what a resuming run may change.

`run_signature`: data, schedule, seed and how the global batch is split; `signature_changes` allows a new
split (batch_size × gradient_accumulation_steps × processes) with the same product, so a run resumes on another
number of GPUs. `model_signature`: the architecture fields, so a checkpoint of another preset is refused by name.
"""

from __future__ import annotations

from .params import TrainParams


def run_signature(params: TrainParams, seq_len: int, num_processes: int, total_steps: int, warmup: int,
                  fingerprint: str) -> dict:
    """What must not change between a checkpoint and the run that resumes it (the per-process split of the
    global batch may: see `signature_changes`)."""
    accumulation = params.accumulation_steps(num_processes)
    return {"batch_size": params.batch_size, "gradient_accumulation_steps": accumulation,
            "num_processes": num_processes, "seq_len": seq_len, "seed": params.seed, "total_steps": total_steps,
            "warmup_steps": warmup, "learning_rate": params.learning_rate, "min_lr_ratio": params.min_lr_ratio,
            "weight_decay": params.weight_decay, "data_fingerprint": fingerprint,
            "global_batch": params.batch_size * accumulation * num_processes}


_PER_PROCESS = ("batch_size", "gradient_accumulation_steps", "num_processes")


def signature_changes(old: dict, new: dict) -> str | None:
    """None when a checkpoint of run `old` may be resumed by run `new`, else what changed.

    The data of step s is the global batch s of a fixed permutation, so batch_size, gradient_accumulation_steps
    and the number of processes may change together as long as their product (the global batch) does not."""
    old = dict(old)
    old.setdefault("global_batch", old["batch_size"] * old["gradient_accumulation_steps"] * old["num_processes"])
    same_global = old["global_batch"] == new["global_batch"]
    diff = {k: (old.get(k), v) for k, v in new.items()
            if old.get(k) != v and k != "global_batch" and not (same_global and k in _PER_PROCESS)}
    if not diff and same_global:
        return None
    message = "; ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in diff.items())
    if not same_global:
        message = (f"({message}); " if message else "") + (
            f"the global batch (batch_size × gradient_accumulation_steps × processes) changed from "
            f"{old['global_batch']} to {new['global_batch']} sequences per step: keep it at {old['global_batch']} "
            "(e.g. set global_batch_size)")
    else:
        message = f"({message})"
    return message


# Config fields that define the architecture (and so the checkpoint's tensors); others (kernel backend,
# checkpointing, init ranges) may change between a checkpoint and the run that resumes it.
_ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "state_size",
                "conv_kernel_size", "expand_factor", "dt_rank", "tie_word_embeddings", "pad_vocab_size_multiple",
                "use_bias", "use_conv_bias", "num_attention_heads", "num_key_value_heads", "use_quantization",
                "quantization_bits")


def model_signature(config, vocab_size: int | None = None) -> dict:
    """The architecture fields of `config` (vocab_size overridden after a resize), as stored in checkpoints."""
    sig = {k: getattr(config, k) for k in _ARCH_FIELDS if hasattr(config, k)}
    if vocab_size is not None:
        sig["vocab_size"] = vocab_size
    return sig
