"""Shared plumbing of the GPU benchmarks: timing with CUDA events, peak memory, the optional mamba-ssm anchor,
the machine record and the JSON writer. Each benchmark script answers one question and imports this."""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

HBM_BYTES_PER_S = 4.0e12  # H200 copy bandwidth measured on the GPU machine (shared/NOTES.md)
BF16_PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16 datasheet peak (MFU denominator)
BF16_MEASURED_FLOPS = 792e12  # bf16 matmul measured on the GPU machine (shared/NOTES.md)
RESULTS = os.path.join(os.path.dirname(__file__), "results")
GiB = 2 ** 30


def time_ms(fn, warmup: int = 3, repeats: int | None = None, budget_ms: float = 1000.0) -> float:
    """Median CUDA-event time of fn() in ms. repeats=None: as many as fit in `budget_ms`, between 3 and 50."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times, n = [], repeats or 3
    while len(times) < n:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if repeats is None and len(times) == 1:
            n = max(3, min(50, int(budget_ms / max(times[0], 1e-3))))
    return sorted(times)[len(times) // 2]


def peak_gib(fn) -> tuple[float, float]:
    """(peak allocated GiB during fn(), of which above what was allocated before it)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / GiB, (peak - before) / GiB


def mamba_ssm_or_reason():
    """The `mamba_ssm` package when its CUDA kernels import, else the reason (a str). Imports transformers
    first (mamba-ssm's import of it otherwise misbehaves with transformers 5.x)."""
    import transformers  # noqa: F401

    try:
        importlib.import_module("selective_scan_cuda")
        return importlib.import_module("mamba_ssm")
    except Exception as exc:
        return f"not importable: {type(exc).__name__}: {exc}"


def machine() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    ms = mamba_ssm_or_reason()
    return {"platform": platform.platform(), "gpu": props.name if props else None,
            "sms": props.multi_processor_count if props else None, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "mamba_ssm": None if isinstance(ms, str) else ms.__version__, "causal_conv1d": causal_conv1d_version()}


def causal_conv1d_version() -> str | None:
    """causal-conv1d's version when its CUDA kernels import (mamba-ssm's fused block and decode step use them;
    without them it silently takes slower paths), else None."""
    try:
        importlib.import_module("causal_conv1d_cuda")
        return importlib.import_module("causal_conv1d").__version__
    except Exception:
        return None


def write_json(path: str, payload: dict) -> None:
    payload = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]), **payload}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=str)
    print(f"wrote {path}")


def scaled_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|: an error relative to the reference's scale."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def mamba_ssm_lm(config, ms, device, dtype=None):
    """mamba-ssm's `MambaLMHeadModel` with exactly our architecture (`convert.config_to_mamba_ssm`)."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    from moai_lib.model.convert import config_to_mamba_ssm

    return MambaLMHeadModel(MambaConfig(**config_to_mamba_ssm(config)), device=device, dtype=dtype)


def copy_weights(ours, theirs) -> None:
    """Load our weights into mamba-ssm's model (same parameter names); every tensor must match."""
    sd = {k: v for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not ours.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"weights do not map 1:1: missing {missing[:5]}, unexpected {unexpected[:5]}")
