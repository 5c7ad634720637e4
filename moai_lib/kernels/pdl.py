"""Programmatic dependent launch (PDL, sm_90+) for the decode step's chain of small kernels.

A batch-1 decode step is ~250 kernels of a few µs each, most of which is latency: the weight GEMVs wait ~1-2 µs
for their first bytes from HBM. With PDL a GEMV is launched while the kernel before it (a norm, the conv or SSM
step, the SiLU·mul) still runs: it loads its first weight tile (weights are not written by the step), then waits
(`gdc_wait`) for that kernel to finish before it reads activations or writes anything. For the GEMV to launch
early, the kernel before it signals at its start that dependents may launch (`gdc_launch_dependents`, a no-op for
kernels launched without PDL); the small kernels do so only for decode-sized inputs (`DECODE_ROWS`), so that
training and prefill launches behave as before.

`pdl_capable(device)`: a CUDA device of compute capability ≥ 9 and a Triton with grid dependency control
(≥ 3.4), unless the environment sets MOAI_PDL=0. Triton's CPU interpreter has no grid dependency control: the
kernels take `PDL`/`TRIGGER` as constexprs that are False there.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - Triton < 3.4
    gdc_launch_dependents = gdc_wait = None

DECODE_ROWS = 16  # inputs of at most this many rows (tokens) count as decode-sized


@functools.cache
def _capable(device: torch.device) -> bool:
    return (gdc_wait is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
            and os.environ.get("MOAI_PDL", "1") != "0")


def pdl_capable(device: torch.device) -> bool:
    """Whether kernels on `device` can use programmatic dependent launch (see the module docstring)."""
    return _capable(device)


def trigger_dependents(device: torch.device, rows: int) -> bool:
    """Whether a small kernel over `rows` rows should let the next kernel launch early (decode-sized inputs)."""
    return rows <= DECODE_ROWS and _capable(device)


def launch_kwargs(pdl: bool) -> dict:
    """The Triton launch option for a PDL launch."""
    return {"launch_pdl": True} if pdl else {}
