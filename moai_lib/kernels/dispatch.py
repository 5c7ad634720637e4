"""The one place that chooses a kernel backend.

Backends:
- ``reference``: the sequential pure-torch oracle (`reference.py`); slow, any device.
- ``torch``: the fast pure-torch path (`cpu.py`): chunked parallel scan; any device, differentiable.
- ``cpu``: the fused C++ scan (`cpu_fused.py`, forward and backward), CPU tensors only; compiled with the system
  C++ compiler on first use and cached. Available when that build succeeds.
- ``mamba_ssm``: state-spaces/mamba's CUDA kernels, when the optional package is installed with them.
- ``triton``: our Triton kernels (`triton_scan.py`: fused scan forward/backward; `triton_decode.py`: decode
  steps; `triton_conv.py`: the full-sequence causal conv, forward and backward). Available when `import
  triton` works and the tensors are on a CUDA GPU, or on the CPU with ``TRITON_INTERPRET=1`` set before
  triton is first imported (Triton's interpreter: slow, for tests).
- ``auto``: the fastest available for the tensors' device: on CUDA ``triton``, then ``mamba_ssm``, then
  ``torch`` with a warning (once); on the CPU ``cpu``, else ``torch`` with a warning (once); on other devices
  ``torch``.

Asking explicitly for a backend that is unavailable raises `BackendUnavailableError` with the reason.
Triton is imported lazily (on the first dispatch that asks about it), so `import moai_lib` does not import it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings

import torch

from ..errors import MoaiError
from . import reference

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "torch", "cpu", "mamba_ssm", "triton")


class BackendUnavailableError(MoaiError, RuntimeError):
    """An explicitly requested kernel backend cannot run here."""


@functools.cache
def _mamba_ssm_ops():
    """Import mamba-ssm's CUDA kernels; returns the module or the reason they are unavailable."""
    if not torch.cuda.is_available():
        return "mamba_ssm needs a CUDA GPU"
    try:
        ops = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        importlib.import_module("selective_scan_cuda")
    except Exception as exc:  # ImportError, or a CUDA build that does not match this torch
        return f"mamba_ssm CUDA kernels are not importable ({type(exc).__name__}: {exc}); " \
               "install them with `pip install mamba-ssm causal-conv1d --no-build-isolation`"
    return ops


@functools.cache
def _triton_import_error() -> str | None:
    """None when `import triton` works, else the reason it does not."""
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a triton build that does not match this platform
        return f"triton is not importable ({type(exc).__name__}: {exc}); install it with `pip install triton`"
    return None


def _triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on `device`, else why not."""
    error = _triton_import_error()
    if error is not None:
        return error
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the Triton kernels need tensors on a CUDA GPU (got {device.type}); on the CPU only under "
            "Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)")


def _cpu_unavailable_reason(device: torch.device) -> str | None:
    """None when the fused C++ CPU scan can run on `device`, else why not (builds it on the first call)."""
    if device.type != "cpu":
        return f"the fused C++ scan needs tensors on the CPU (got {device.type})"
    from .cpu_fused import load_library

    lib = load_library()
    return lib if isinstance(lib, str) else None


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` in this environment (without 'auto')."""
    device = torch.device(device)
    names = ["reference", "torch"]
    if device.type == "cpu" and _cpu_unavailable_reason(device) is None:
        names.append("cpu")
    if device.type == "cuda" and not isinstance(_mamba_ssm_ops(), str):
        names.append("mamba_ssm")
    if _triton_unavailable_reason(device) is None:
        names.append("triton")
    return names


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Map a requested backend to a concrete one for `device`, raising if an explicit one cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cpu":
            reason = _cpu_unavailable_reason(device)
            if reason is None:
                return "cpu"
            _warn_once(f"the fused C++ CPU selective scan is unavailable: {reason}; falling back to the pure-torch "
                       "chunked scan (backend 'torch'), several times slower")
            return "torch"
        if device.type != "cuda":
            return "torch"
        available = available_backends(device)
        for name in ("triton", "mamba_ssm"):
            if name in available:
                return name
        _warn_once(
            "no GPU selective-scan kernel is available (neither triton nor the mamba_ssm CUDA kernels are "
            f"installed: {_triton_unavailable_reason(device)}); "
            "falling back to the pure-torch chunked scan, which is much slower on GPU"
        )
        return "torch"
    if backend == "cpu":
        reason = _cpu_unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailableError(f"backend 'cpu' is unavailable: {reason}")
    if backend == "triton":
        reason = _triton_unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailableError(f"backend 'triton' is unavailable: {reason}")
    if backend == "mamba_ssm":
        ops = _mamba_ssm_ops() if device.type == "cuda" else "mamba_ssm needs tensors on a CUDA GPU"
        if isinstance(ops, str):
            raise BackendUnavailableError(f"backend 'mamba_ssm' is unavailable: {ops}")
    return backend


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None, backend: str = "auto", checkpoint_every: int = 0,
    grad_in_place: bool = False,
):
    """Selective scan with the semantics of `reference.selective_scan_ref` (shapes documented there).
    Backend triton only (the others ignore them): `checkpoint_every` saves the backward's state checkpoints every
    that many steps instead of every chunk (`triton_scan.ScanConfig.checkpoint_every`), less memory, slower;
    `grad_in_place` lets the backward write d(delta) over delta and du over the output's gradient (less memory;
    only when the caller owns both, see `triton_scan.selective_scan_triton`)."""
    name = resolve_backend(backend, u.device)
    if name == "reference":
        fn = reference.selective_scan_ref
    elif name == "torch":
        from .cpu import selective_scan_chunked as fn
    elif name == "cpu":
        from .cpu_fused import selective_scan_fused as fn
    elif name == "triton":
        from .triton_scan import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     initial_state, checkpoint_every=checkpoint_every,
                                     grad_in_place=grad_in_place)
    else:
        if initial_state is not None:
            raise BackendUnavailableError(
                "backend 'mamba_ssm' does not accept an initial state; use backend='torch' to continue "
                "a scan from a cached state"
            )
        fn = _mamba_ssm_ops().selective_scan_fn
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           backend: str = "auto"):
    """One decode step of the scan; updates `state` (B, D, N) in place. See `reference`."""
    name = resolve_backend(backend, x.device)
    if name == "mamba_ssm":
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as fn

        return fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    if name == "triton":
        from .triton_decode import selective_state_update_triton

        return selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return reference.selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def causal_conv1d(x, weight, bias=None, initial_states=None, return_final_states=False, activation=None,
                  backend: str = "auto"):
    """Depthwise causal conv1d (B, D, L), shapes as `reference.causal_conv1d_ref`. Backend ``triton``: the Triton
    kernels (`triton_conv.py`; x of any strides, the output a (B, D, L) view of (B, L, D) memory) for widths up
    to `triton_conv.MAX_WIDTH`; every other backend, and shapes those kernels do not take, use torch's conv."""
    if resolve_backend(backend, x.device) == "triton":
        from .triton_conv import causal_conv1d_triton, unsupported_reason

        reason = unsupported_reason(x, weight)
        if reason is None:
            return causal_conv1d_triton(x, weight, bias, initial_states, return_final_states, activation)
        _warn_once(f"{reason}: using torch's conv")
    return reference.causal_conv1d_ref(x, weight, bias, initial_states, return_final_states, activation)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, backend: str = "auto"):
    """One decode step of the causal conv; updates `conv_state` (B, D, W-1) in place."""
    if resolve_backend(backend, x.device) == "triton":
        from .triton_decode import causal_conv1d_update_triton

        return causal_conv1d_update_triton(x, conv_state, weight, bias, activation)
    return reference.causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
