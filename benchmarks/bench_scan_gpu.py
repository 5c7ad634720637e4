"""Selective scan on the GPU: our Triton kernels vs mamba-ssm's CUDA kernel vs the pure-torch paths.

Question: how fast are the Triton scan's forward and forward+backward at B=8, D=4096, N=16, bf16, against the
mamba-ssm anchor, and what fraction of the H200's limits do they reach?

First it validates every variant it will time (and every launch shape of ours) against the sequential reference on a
small problem, outputs and all gradients; a variant that fails validation is not timed. "triton channels-last
(ours)" is our scan on the mixer's layout (u, delta, z, dy as (B, L, D) memory viewed as (B, D, L), z and B/C as
column slices of in_proj's / x_proj's outputs; `MambaMixer.forward` with backend triton): no copies. Then it times,
with CUDA events after warmup (median), forward (under no_grad) and forward+backward for L in 512, 2K, 8K, 32K:
ours, mamba-ssm's `selective_scan_fn` when importable (the anchor; build it on the machine first), the pure-torch
chunked scan (`kernels/cpu.py`, L <= 2048) and the sequential reference (L = 2048, forward, one repeat). Achieved
GB/s use `triton_scan.essential_bytes` (the bytes any implementation must move: 8 B per element forward, 22 B
forward+backward in bf16) against ~4 TB/s of HBM copy bandwidth; the exp floor is B*D*L*N exponentials per pass at
16 per clock per SM. A variant that fails (out of memory, compile error) records the error in its row and the run
goes on.

    python benchmarks/bench_scan_gpu.py            # a few minutes on an H200, Triton compiles included
    python benchmarks/bench_scan_gpu.py --sweep    # first times 5+5 launch shapes of ours at L=2048 and uses the
                                                   # fastest for the table (a few more minutes; at small B*D,
                                                   # e.g. --batch 1, narrower shapes)
    python benchmarks/bench_scan_gpu.py --checkpoint-every 256   # adds 'triton (ours, checkpoint every 256)':
                                                   # sparse state checkpoints (`ScanConfig.checkpoint_every`)

Forward+backward rows also record the peak memory one step allocates above what was allocated before it
(`peak_mib`: the checkpoints, outputs and gradients; the inputs excluded).

Prints a Markdown table and writes benchmarks/results/scan_gpu.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from moai_lib.kernels.cpu import selective_scan_chunked  # noqa: E402
from moai_lib.kernels.reference import selective_scan_ref  # noqa: E402

HBM_BYTES_PER_S = 4.0e12  # H200 copy bandwidth measured on the GPU machine (shared/NOTES.md)
EXP_PER_CLOCK_PER_SM = 16  # MUFU ex2 throughput on sm_90
ASSUMED_CLOCK_HZ = 1.98e9  # H200 boost clock, when torch does not report one

VALIDATION_SHAPE = (2, 64, 16, 4500)  # B, D, N, L: not a multiple of any chunk; long enough for ours to split L
SWEEP_LENGTH = 2048
# Launch shapes of ours worth timing, from static SASS counts (the default first): (block_d, block_l, num_warps
# [, d_regs]). Larger register tiles than these spill.
FWD_SWEEP = [(32, 4, 1), (32, 8, 1), (64, 4, 1), (16, 8, 1), (32, 2, 1)]
BWD_SWEEP = [(16, 4, 1, 2), (32, 2, 1, 4), (8, 8, 1, 1), (16, 2, 1, 2), (8, 4, 1)]
# For small B*D (batch 1) the defaults are narrow (few programs): narrower blocks and more warps per program.
FWD_SWEEP_SMALL = [(8, 4, 1), (4, 4, 1), (8, 2, 1), (16, 4, 2), (8, 8, 1)]
BWD_SWEEP_SMALL = [(8, 4, 1), (4, 4, 1), (8, 2, 1), (4, 2, 1), (16, 4, 2, 2)]
# On the model's channels-last layout (`--sweep-channels-last`) a program's channels are its contiguous bytes per
# time step: longer chunks and wider blocks. Measured slower at B=8, D=4096 and dropped (fifth session,
# results/scan_sweep_channels_last.txt): forward (64, 4, 2), (128, 4, 4), (64, 4, 1); backward (32, 4, 2, 2),
# (64, 4, 4, 2). The defaults are always timed too.
FWD_SWEEP_CL = [(32, 8, 1), (16, 8, 1)]
BWD_SWEEP_CL = [(32, 4, 1, 4), (16, 8, 1, 2), (8, 8, 1), (8, 4, 1), (16, 4, 2, 2), (16, 2, 1, 2)]
# Forward shapes timed forward+backward with the default backward (mode "fwd_train": the forward also writes the
# backward's checkpoints, from inside its chunks where the backward's are shorter). Seventh session, before the
# 8-step backward became the channels-last default: (16, 8, 1) 2.95 vs (16, 4, 1) 3.16 ms at B=8, D=2048.
FWD_TRAIN_SWEEP_CL = [(32, 8, 1), (16, 8, 1)]


def channels_last(inputs: dict) -> dict:
    """The mixer's layout (`MambaMixer.forward`, backend triton) with the same values: u, delta as (B, L, D)
    memory viewed transposed; z as the second half of a (B, L, 2D) tensor (in_proj's output); B, C as columns of a
    (B, L, R + 2N) tensor (x_proj's output, R = ceil(D / 16))."""
    u = inputs["u"]
    batch, dim, length = u.shape
    dstate = inputs["B"].shape[1]
    rank = -(-dim // 16)
    xz = torch.empty(batch, length, 2 * dim, device=u.device, dtype=u.dtype)
    xz[..., dim:] = inputs["z"].transpose(1, 2)
    x_dbl = torch.zeros(batch, length, rank + 2 * dstate, device=u.device, dtype=u.dtype)
    x_dbl[..., rank:rank + dstate] = inputs["B"].transpose(1, 2)
    x_dbl[..., rank + dstate:] = inputs["C"].transpose(1, 2)
    return dict(inputs, u=u.transpose(1, 2).contiguous().transpose(1, 2),
                delta=inputs["delta"].transpose(1, 2).contiguous().transpose(1, 2), z=xz[..., dim:].transpose(1, 2),
                B=x_dbl[..., rank:rank + dstate].transpose(1, 2), C=x_dbl[..., rank + dstate:].transpose(1, 2))


CHANNELS_LAST = "triton channels-last (ours)"


def make_inputs(batch, dim, dstate, length, dtype, seed=0, layout_cl=False):
    """Mamba-like inputs: A = -(1..N) (the A_log init), dt bias = inverse softplus of log-uniform [1e-3, 0.1].
    layout_cl: in the mixer's channels-last layout (`channels_last`)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    dt = torch.exp(torch.rand(dim, device="cuda", generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inputs = dict(
        u=randn(batch, dim, length).to(dtype),
        delta=(0.5 * randn(batch, dim, length)).to(dtype),
        A=-torch.arange(1, dstate + 1, device="cuda", dtype=torch.float32).repeat(dim, 1),
        B=randn(batch, dstate, length).to(dtype),
        C=randn(batch, dstate, length).to(dtype),
        D=torch.ones(dim, device="cuda"),
        z=randn(batch, dim, length).to(dtype),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),
    )
    return channels_last(inputs) if layout_cl else inputs


def ckpt_variant(every: int) -> str:
    return f"triton (ours, checkpoint every {every})"


def scan_variants(fwd_cfg, bwd_cfg, swept: bool, checkpoint_every: int = 0):
    """name -> fn(**inputs, delta_softplus=True) -> y, or the reason the variant is unavailable. Ours runs with
    the launch shapes it picks itself (what a user gets), or with the sweep's fastest (`swept`); with
    `checkpoint_every`, also with the backward's sparse checkpoints."""
    from moai_lib.kernels.triton_scan import ScanConfig, selective_scan_triton

    fc, bc = ScanConfig(*fwd_cfg), ScanConfig(*bwd_cfg)
    ours = (lambda **kw: selective_scan_triton(**kw, fwd_config=fc, bwd_config=bc)) if swept else selective_scan_triton
    variants = {
        "triton (ours)": ours,
        CHANNELS_LAST: ours,
        # The same kernels without the split over L that small batches get (`triton_scan_seg`).
        "triton (ours, unsplit)": lambda **kw: selective_scan_triton(**kw, fwd_config=fc, bwd_config=bc,
                                                                     segment_len=0),
        "torch chunked": selective_scan_chunked,
        "reference": selective_scan_ref,
    }
    if checkpoint_every:
        kw_cfg = dict(fwd_config=fc, bwd_config=bc) if swept else {}
        variants[ckpt_variant(checkpoint_every)] = lambda **kw: selective_scan_triton(
            **kw, **kw_cfg, checkpoint_every=checkpoint_every)
    try:
        importlib.import_module("selective_scan_cuda")
        variants["mamba-ssm"] = importlib.import_module("mamba_ssm.ops.selective_scan_interface").selective_scan_fn
    except Exception as exc:  # not built on this machine
        variants["mamba-ssm"] = f"not importable: {type(exc).__name__}: {exc}"
    return variants


def fwd_bwd_grads(fn, inputs, dy):
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=True)
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    return y, dict(zip(leaves, grads, strict=True))


def max_scaled_error(fn, dtype, layout_cl=False) -> float:
    """Largest error of y and every gradient against the fp32 sequential reference, scaled by the reference's
    largest magnitude, on a small problem with the inputs rounded to `dtype`."""
    shape = VALIDATION_SHAPE
    inputs = make_inputs(*shape, dtype, seed=1, layout_cl=layout_cl)
    dy = torch.randn(shape[0], shape[1], shape[3], device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    y, grads = fwd_bwd_grads(fn, inputs, dy.to(dtype))
    y_ref, grads_ref = fwd_bwd_grads(selective_scan_ref, {k: v.float() for k, v in inputs.items()}, dy)
    pairs = [(y, y_ref)] + [(grads[k], grads_ref[k]) for k in grads]
    return max(((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in pairs)


# fp32: summation order only; bf16: bf16 rounding of inputs, outputs and gradients (a few ulps of 2^-8).
VALIDATION_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def validate(name, fn) -> str | None:
    """None when `fn` matches the reference in fp32 and bf16, else the reason."""
    try:
        for dtype, tol in VALIDATION_TOL.items():
            err = max_scaled_error(fn, dtype, layout_cl=name == CHANNELS_LAST)
            if not err <= tol:
                return f"validation failed in {dtype}: scaled error {err:.2e} > {tol:.0e}"
    except Exception as exc:
        traceback.print_exc()
        return f"validation raised {type(exc).__name__}: {exc}"
    return None


def time_ms(fn, warmup: int, repeats: int | None) -> float:
    """Median CUDA-event time of fn() in ms. repeats=None: as many as fit in ~1 s, between 3 and 50."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    n = repeats or 3
    while len(times) < n:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if repeats is None and len(times) == 1:
            n = max(3, min(50, int(1000.0 / max(times[0], 1e-3))))
    return sorted(times)[len(times) // 2]


def measure(fn, batch, dim, dstate, length, mode: str, warmup: int, repeats: int | None,
            layout_cl: bool = False) -> tuple[float, float | None]:
    """(median ms, for fwd+bwd the MiB one step allocates at its peak above what was allocated before it)."""
    inputs = make_inputs(batch, dim, dstate, length, torch.bfloat16, layout_cl=layout_cl)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(**inputs, delta_softplus=True)
    else:
        leaves = {k: v.requires_grad_() for k, v in inputs.items()}
        dy = torch.randn(batch, dim, length, device="cuda", dtype=torch.bfloat16)
        if layout_cl:  # out_proj's backward gives dy as (B, L, D) memory
            dy = dy.transpose(1, 2).contiguous().transpose(1, 2)

        def run():
            y = fn(**leaves, delta_softplus=True)
            torch.autograd.grad(y, list(leaves.values()), dy)
    try:
        ms = time_ms(run, warmup, repeats)
        if mode == "fwd":
            return ms, None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return ms, (torch.cuda.max_memory_allocated() - base) / 2**20
    finally:
        torch.cuda.empty_cache()


def sweep(args) -> tuple[tuple, tuple, list]:
    """Times each launch shape of ours at SWEEP_LENGTH (forward alone; forward+backward with the default forward);
    returns the fastest (fwd, bwd) and the rows. Each shape is validated first."""
    from moai_lib.kernels.triton_scan import ScanConfig, default_configs, selective_scan_triton

    length = SWEEP_LENGTH
    default_fwd, default_bwd = default_configs(args.batch, args.dim, args.dstate)
    rows = []
    best = {"fwd": (astuple(default_fwd), math.inf), "bwd": (astuple(default_bwd), math.inf)}
    small = args.batch * args.dim < 1024 * 16  # default_configs' narrow regime
    fwd_shapes, bwd_shapes = (FWD_SWEEP_SMALL, BWD_SWEEP_SMALL) if small else (FWD_SWEEP, BWD_SWEEP)
    cl = args.sweep_channels_last
    modes = [("fwd", fwd_shapes), ("bwd", bwd_shapes)]
    if cl:
        default_fwd, default_bwd = default_configs(args.batch, args.dim, args.dstate, channels_last=True)
        if not small:
            modes = [("fwd", FWD_SWEEP_CL), ("fwd_train", FWD_TRAIN_SWEEP_CL), ("bwd", BWD_SWEEP_CL)]
    for mode, shapes in modes:  # the defaults are always among the timed
        default = astuple(default_bwd if mode == "bwd" else default_fwd)
        if default not in shapes:
            shapes.insert(0, default)
    best["fwd_train"] = (astuple(default_fwd), math.inf)
    for mode, shapes in modes:
        for shape in shapes:
            cfg = ScanConfig(*shape)
            kw = {"bwd_config": cfg} if mode == "bwd" else {"fwd_config": cfg}
            fn = lambda _kw=kw, **inp: selective_scan_triton(**inp, **_kw)  # noqa: E731
            default = astuple(default_bwd if mode == "bwd" else default_fwd)
            row = {"pass": mode, "config": shape, "default": tuple(shape) == default}
            row["error"] = validate(CHANNELS_LAST if cl else f"triton {shape}", fn)
            if row["error"] is None:
                try:
                    row["ms"] = measure(fn, args.batch, args.dim, args.dstate, length,
                                        "fwd" if mode == "fwd" else "fwd+bwd", warmup=3, repeats=None,
                                        layout_cl=cl)[0]
                    if row["ms"] < best[mode][1]:
                        best[mode] = (shape, row["ms"])
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    torch.cuda.empty_cache()
            print(f"sweep {mode} {shape}: {row.get('ms', row['error'])}", flush=True)
            rows.append(row)
    return best["fwd"][0], best["bwd"][0], rows


def astuple(cfg) -> tuple:
    return (cfg.block_d, cfg.block_l, cfg.num_warps) + ((cfg.d_regs,) if cfg.d_regs != 1 else ())


def floors_ms(batch, dim, dstate, length, mode, sms, clock_hz) -> tuple[float, float]:
    """(HBM floor, exp floor) in ms for bf16 inputs."""
    from moai_lib.kernels.triton_scan import essential_bytes

    nbytes = essential_bytes(batch, dim, dstate, length, 2, backward=mode != "fwd")
    exps = batch * dim * length * dstate * (1 if mode == "fwd" else 2)
    return nbytes / HBM_BYTES_PER_S * 1e3, exps / (sms * EXP_PER_CLOCK_PER_SM * clock_hz) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--dstate", type=int, default=16)
    p.add_argument("--lengths", default="512,2048,8192,32768")
    p.add_argument("--sweep", action="store_true", help="time alternative launch shapes of ours first")
    p.add_argument("--sweep-channels-last", action="store_true",
                   help="with --sweep: sweep on the model's channels-last layout (and wider blocks)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also time ours with sparse state checkpoints every this many steps (0: no)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "scan_gpu.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    import triton

    from moai_lib.kernels.triton_scan import ScanConfig, default_configs, essential_bytes

    # A bad --checkpoint-every fails here, before any work (ScanConfigError names the valid values).
    ScanConfig(*astuple(default_configs(args.batch, args.dim, args.dstate)[1]), checkpoint_every=args.checkpoint_every)

    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    clock_khz = getattr(props, "clock_rate", 0)
    clock_hz = clock_khz * 1e3 if clock_khz else ASSUMED_CLOCK_HZ
    t_start = time.time()
    default_fwd, default_bwd = default_configs(args.batch, args.dim, args.dstate)
    fwd_cfg, bwd_cfg = astuple(default_fwd), astuple(default_bwd)
    sweep_rows = []
    if args.sweep:
        fwd_cfg, bwd_cfg, sweep_rows = sweep(args)

    variants = scan_variants(fwd_cfg, bwd_cfg, swept=args.sweep, checkpoint_every=args.checkpoint_every)
    from moai_lib.kernels.triton_scan_seg import segment_len_for
    status = {}
    for name, fn in variants.items():
        status[name] = fn if isinstance(fn, str) else (None if name == "reference" else validate(name, fn))
        print(f"validate {name}: {status[name] or 'ok'}", flush=True)

    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for length in lengths:
        ckpt = [ckpt_variant(args.checkpoint_every)] if args.checkpoint_every else []
        for name in ("triton (ours)", *ckpt, CHANNELS_LAST, "triton (ours, unsplit)", "mamba-ssm", "torch chunked",
                     "reference"):
            for mode in ("fwd", "fwd+bwd"):
                if name == "triton (ours, unsplit)" and not segment_len_for(args.batch, args.dim, length):
                    continue  # ours does not split at this shape: the same row twice
                if name == "torch chunked" and length > 2048:
                    continue
                if name == "reference" and (length != 2048 or mode != "fwd"):
                    continue
                hbm_floor, exp_floor = floors_ms(args.batch, args.dim, args.dstate, length, mode, sms, clock_hz)
                row = {"variant": name, "L": length, "pass": mode, "hbm_floor_ms": hbm_floor,
                       "exp_floor_ms": exp_floor}
                if status[name] is not None:
                    row["error"] = status[name]
                else:
                    slow = name in ("torch chunked", "reference")
                    try:
                        ms, peak_mib = measure(variants[name], args.batch, args.dim, args.dstate, length, mode,
                                     warmup=0 if name == "reference" else (1 if slow else 3),
                                     repeats=1 if name == "reference" else (3 if slow else None),
                                     layout_cl=name == CHANNELS_LAST)
                        nbytes = essential_bytes(args.batch, args.dim, args.dstate, length, 2, mode != "fwd")
                        if peak_mib is not None:
                            row["peak_mib"] = peak_mib
                        row.update(ms=ms, gb_per_s=nbytes / ms / 1e6, hbm_fraction=nbytes / ms / 1e-3 / HBM_BYTES_PER_S,
                                   x_exp_floor=ms / exp_floor)
                    except Exception as exc:
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                        torch.cuda.empty_cache()
                print(f"{name} L={length} {mode}: {row.get('ms', row.get('error'))}", flush=True)
                rows.append(row)

    print(f"\nB={args.batch} D={args.dim} N={args.dstate} bf16 on {props.name} ({sms} SMs); ours: fwd {fwd_cfg}, "
          f"bwd {bwd_cfg}; HBM {HBM_BYTES_PER_S / 1e12:.0f} TB/s, exp floor at {clock_hz / 1e9:.2f} GHz\n")
    print("| variant | L | pass | ms | speed vs mamba-ssm | GB/s (essential) | of HBM | x exp floor | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    anchor = {(r["L"], r["pass"]): r["ms"] for r in rows if r["variant"] == "mamba-ssm" and "ms" in r}
    for r in rows:
        if "ms" in r:
            vs = f"{anchor[(r['L'], r['pass'])] / r['ms']:.2f}x" if (r["L"], r["pass"]) in anchor else "-"
            peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
            print(f"| {r['variant']} | {r['L']} | {r['pass']} | {r['ms']:.3f} | {vs} | {r['gb_per_s']:.0f} | "
                  f"{r['hbm_fraction']:.1%} | {r['x_exp_floor']:.1f} | {peak} |")
        else:
            print(f"| {r['variant']} | {r['L']} | {r['pass']} | error: {r['error'][:80]} | | | | | |")
    if sweep_rows:
        print(f"\nLaunch-shape sweep of ours at L={SWEEP_LENGTH} (fwd: forward alone; bwd: forward+backward):\n")
        print("| pass | config | default | ms |")
        print("|---|---|---|---|")
        for r in sweep_rows:
            cell = f"{r['ms']:.3f}" if "ms" in r else f"error: {r['error'][:80]}"
            print(f"| {r['pass']} | {r['config']} | {'yes' if r['default'] else ''} | {cell} |")
    print(f"\ntotal {time.time() - t_start:.0f} s")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    mamba_version = None
    try:
        mamba_version = importlib.import_module("mamba_ssm").__version__
    except Exception:
        pass
    with open(args.out, "w") as f:
        json.dump({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "gpu": props.name, "sms": sms,
                        "clock_hz": clock_hz, "clock_assumed": not clock_khz, "torch": torch.__version__,
                        "triton": triton.__version__, "mamba_ssm": mamba_version,
                        "cuda": torch.version.cuda},
            "command": " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
            "shape": {"batch": args.batch, "dim": args.dim, "dstate": args.dstate, "dtype": "bfloat16"},
            "checkpoint_every": args.checkpoint_every,
            "ours_configs": {"fwd": fwd_cfg, "bwd": bwd_cfg},
            "validation": status,
            "rows": rows,
            "sweep": sweep_rows,
        }, f, indent=2, default=str)


if __name__ == "__main__":
    main()
