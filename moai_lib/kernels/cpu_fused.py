"""Fused C++ selective scan for the CPU (backend ``cpu``): forward and backward in one pass per (b, d) row.

Same signature and semantics as `reference.selective_scan_ref` (the spec). The kernel
(`csrc/selective_scan_cpu.cpp`) keeps the N-float state of a channel in vector registers and runs the time
loop inside; threads take (b, d) rows. The forward stores the state entering every 64-step tile, and the
backward recomputes each tile from it before running the reverse recurrence (as the CUDA kernel of
state-spaces/mamba does), so no B*D*L*N tensor is ever materialized.

Build: the C++ file has no torch headers; it is a plain C ABI called through ctypes (rather than a
torch.utils.cpp_extension module: its JIT `load()` needs ninja, the torch headers alone take longer to compile
than the kernel, and the library then does not depend on the torch version's ABI). It is compiled with the
system C++ compiler (``$CXX`` or ``g++``) on first use (g++ 12 here: ~8 s of CPU time) and cached under
``$MOAI_KERNEL_CACHE`` (default ``~/.cache/moai/kernels``) by a hash of the source, the command and the
machine type, with a file lock so concurrent processes (pytest-xdist workers) build it once;
`scripts/setup.sh` builds it at install time. No -march=native: the library holds an AVX2+FMA copy of the
kernels and a baseline one (SSE2/NEON width) and picks one at run time, so it is valid on any CPU of its
architecture. If it cannot be built, `load_library()` returns the reason and `dispatch` falls back to the
pure-torch chunked scan (``auto``, with a warning) or raises (``cpu`` asked for explicitly).

Limits: N <= 32 (the state lives in at most four 8-float vectors); larger N goes to the chunked torch scan.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.cpp"
# -O3 and the portable baseline ISA (the AVX2 copy is selected inside the library); no -ffast-math: the
# exp polynomial's rounding trick and the NaN/inf handling need IEEE semantics.
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", "-Wno-psabi", "-fno-math-errno"]
MAX_DSTATE = 32


def _cache_dir() -> Path:
    root = os.environ.get("MOAI_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moai" / "kernels"


def _build(compiler: str) -> Path:
    """Compile SOURCE into the cache (once per source/command hash) and return the library's path."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *CXXFLAGS, platform.machine()]).encode()).hexdigest()[:16]
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"selective_scan_cpu-{key}.so"
    if lib.exists():
        return lib
    with open(cache / f"selective_scan_cpu-{key}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then reuse its build
        except ImportError:  # no fcntl (Windows): the atomic rename below still keeps builds consistent
            pass
        if lib.exists():
            return lib
        logger.info("building the fused CPU scan with %s (once; cached in %s)", compiler, cache)
        t0 = time.perf_counter()
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            proc = subprocess.run([compiler, *CXXFLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"`{compiler}` failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        logger.info("built the fused CPU scan in %.1f s: %s", time.perf_counter() - t0, lib)
    return lib


class _FwdArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("u", "delta", "A", "Bt", "Ct", "Dv", "z", "bias", "h0")] + [
        ("su", ctypes.c_int64 * 3), ("sdelta", ctypes.c_int64 * 3), ("sz", ctypes.c_int64 * 3),
        *[(name, ctypes.c_int64) for name in ("batch", "dim", "len", "dstate", "np")],
        ("softplus", ctypes.c_int),
        *[(name, ctypes.c_void_p) for name in ("out", "last", "ckpt")],
    ]


class _BwdArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("u", "delta", "A", "Bt", "Ct", "Dv", "z", "bias", "gout", "glast", "ckpt")] + [
        ("su", ctypes.c_int64 * 3), ("sdelta", ctypes.c_int64 * 3), ("sz", ctypes.c_int64 * 3),
        ("sgout", ctypes.c_int64 * 3),
        *[(name, ctypes.c_int64) for name in ("batch", "dim", "len", "dstate", "np")],
        ("softplus", ctypes.c_int),
        *[(name, ctypes.c_void_p) for name in ("gu", "gdelta", "gz", "gA", "gD", "gbias", "gh0", "gBt", "gCt")],
        ("n_slots", ctypes.c_int64),
    ]


@functools.cache
def load_library() -> ctypes.CDLL | str:
    """The compiled kernel library, or the reason it is unavailable (built on the first call, then cached)."""
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        return f"no C++ compiler to build it (`{compiler}` not found; set CXX or install g++)"
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except Exception as exc:  # compiler error, unwritable cache, or a library the loader rejects
        return f"building or loading {SOURCE.name} failed ({type(exc).__name__}: {exc})"
    lib.moai_scan_fwd.argtypes = [ctypes.POINTER(_FwdArgs), ctypes.c_int, ctypes.c_int]
    lib.moai_scan_bwd.argtypes = [ctypes.POINTER(_BwdArgs), ctypes.c_int, ctypes.c_int]
    lib.moai_scan_fwd.restype = lib.moai_scan_bwd.restype = ctypes.c_int
    lib.moai_scan_isa.argtypes = [ctypes.c_int]
    lib.moai_scan_isa.restype = ctypes.c_char_p
    lib.moai_scan_tile.restype = ctypes.c_int64
    return lib


def kernel_isa() -> str:
    """The instruction set the fused kernels run with here ("avx2" or "base"); raises if unavailable."""
    return _lib().moai_scan_isa(-1).decode()


def _lib() -> ctypes.CDLL:
    lib = load_library()
    if isinstance(lib, str):
        raise RuntimeError(f"the fused CPU scan is unavailable: {lib}")
    return lib


# isa passed to the library: -1 = best available, 0 = baseline (tests set this to cover the portable copy).
_ISA = {"value": -1}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _strides(t: torch.Tensor | None):
    return (ctypes.c_int64 * 3)(*(t.stride() if t is not None else (0, 0, 0)))


def _padded_t(x: torch.Tensor, np_: int) -> torch.Tensor:
    """(B, N, L) -> fp32 (B, L, NP), zero-padded on N: the kernel reads one contiguous NP row per step."""
    return F.pad(x.float().transpose(1, 2), (0, np_ - x.shape[1])).contiguous()


class _FusedScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus):
        # u, delta, z: (B, D, L) any strides; A: (D, N); B, C: (B, N, L); D, delta_bias: (D,); h0: (B, D, N).
        batch, dim, length = u.shape
        dstate = A.shape[1]
        np_ = -(-dstate // 8) * 8
        n_tiles = -(-length // _lib().moai_scan_tile())
        u32, delta32 = u.float(), delta.float()  # no copy for fp32; keeps the caller's strides
        z32 = z.float() if z is not None else None
        A32 = A.float().contiguous()
        Bt, Ct = _padded_t(B, np_), _padded_t(C, np_)
        D32 = D.float().contiguous() if D is not None else None
        bias32 = delta_bias.float().contiguous() if delta_bias is not None else None
        h0_32 = h0.float().contiguous() if h0 is not None else None
        out = torch.empty((batch, dim, length), dtype=torch.float32)
        last = torch.empty((batch, dim, dstate), dtype=torch.float32)
        ckpt = torch.empty((batch, dim, n_tiles, np_)) if any(ctx.needs_input_grad) else None
        args = _FwdArgs(
            _ptr(u32), _ptr(delta32), _ptr(A32), _ptr(Bt), _ptr(Ct), _ptr(D32), _ptr(z32), _ptr(bias32),
            _ptr(h0_32), _strides(u32), _strides(delta32), _strides(z32), batch, dim, length, dstate, np_,
            int(delta_softplus), _ptr(out), _ptr(last), _ptr(ckpt),
        )
        if _lib().moai_scan_fwd(ctypes.byref(args), torch.get_num_threads(), _ISA["value"]) != 0:
            raise RuntimeError(f"fused CPU scan: unsupported state size N={dstate}")
        ctx.delta_softplus = delta_softplus
        ctx.dtypes = (B.dtype, C.dtype, A.dtype, h0.dtype if h0 is not None else None)
        ctx.save_for_backward(u, delta, z, A32, Bt, Ct, D32, bias32, ckpt)
        return out.to(u.dtype), last

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_last):
        u, delta, z, A32, Bt, Ct, D32, bias32, ckpt = ctx.saved_tensors
        batch, dim, length = u.shape
        dstate, np_ = A32.shape[1], Bt.shape[2]
        threads = torch.get_num_threads()
        u32, delta32, gout32 = u.float(), delta.float(), g_out.float()
        z32 = z.float() if z is not None else None
        glast32 = g_last.float().contiguous() if g_last is not None else None
        g_u, g_delta = torch.empty((batch, dim, length)), torch.empty((batch, dim, length))
        g_z = torch.empty((batch, dim, length)) if z is not None else None
        g_A, g_h0 = torch.empty((dim, dstate)), torch.empty((batch, dim, dstate))
        g_D = torch.empty(dim) if D32 is not None else None
        g_bias = torch.empty(dim) if bias32 is not None else None
        # B and C gradients: partial sums per slot of channels, several slots per thread for balance (a fixed
        # partition: the sum does not depend on thread timing), summed below in slot order.
        slots = min(dim, max(threads, min(4 * threads, 16)))
        g_Bt, g_Ct = torch.empty((slots, batch, length, np_)), torch.empty((slots, batch, length, np_))
        args = _BwdArgs(
            _ptr(u32), _ptr(delta32), _ptr(A32), _ptr(Bt), _ptr(Ct), _ptr(D32), _ptr(z32), _ptr(bias32),
            _ptr(gout32), _ptr(glast32), _ptr(ckpt), _strides(u32), _strides(delta32), _strides(z32),
            _strides(gout32), batch, dim, length, dstate, np_, int(ctx.delta_softplus), _ptr(g_u), _ptr(g_delta),
            _ptr(g_z), _ptr(g_A), _ptr(g_D), _ptr(g_bias), _ptr(g_h0), _ptr(g_Bt), _ptr(g_Ct), slots,
        )
        if _lib().moai_scan_bwd(ctypes.byref(args), threads, _ISA["value"]) != 0:
            raise RuntimeError(f"fused CPU scan: unsupported state size N={dstate}")
        b_dtype, c_dtype, a_dtype, h0_dtype = ctx.dtypes
        g_B = g_Bt.sum(0)[..., :dstate].transpose(1, 2).to(b_dtype)  # (B, N, L)
        g_C = g_Ct.sum(0)[..., :dstate].transpose(1, 2).to(c_dtype)
        return (
            g_u.to(u.dtype), g_delta.to(delta.dtype), g_A.to(a_dtype), g_B, g_C,
            g_D, g_z.to(z.dtype) if z is not None else None, g_bias,
            g_h0.to(h0_dtype) if h0_dtype is not None else None, None,
        )


@torch.compiler.disable  # an opaque ctypes call: torch.compile runs it eagerly instead of tracing into it
def selective_scan_fused(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
):
    """Selective scan with exactly the semantics of `reference.selective_scan_ref`, fused in C++ (CPU tensors).

    u, delta, z: (B, D, L); A: (D, N) real, N <= 32; B, C: (B, N, L); D, delta_bias: (D,);
    initial_state: (B, D, N). Computes in fp32; returns y (B, D, L) in u's dtype and, if `return_last_state`,
    the final state (B, D, N) fp32. Differentiable w.r.t. every tensor argument. Extra memory: the state at
    every 64th step, B*D*N*L/64 floats, kept for the backward. Uses `torch.get_num_threads()` threads.
    """
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"A must be real with shape (D, N) = ({dim}, N), got {tuple(A.shape)} {A.dtype}")
    dstate = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, dstate, length):
            raise ValueError(f"{name} must have shape (B, N, L) = {(batch, dstate, length)}, got {tuple(t.shape)}")
    if u.device.type != "cpu":
        raise ValueError(f"the fused CPU scan needs CPU tensors, got {u.device}")
    if dstate > MAX_DSTATE:  # the kernel keeps the state in registers: hand large N to the chunked scan
        from .cpu import selective_scan_chunked

        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                      initial_state)
    out, last_state = _FusedScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)
    return (out, last_state) if return_last_state else out
