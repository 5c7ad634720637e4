"""Quantized linear layers at the `2b` preset's shapes: validate against bf16, then time, then compare with
the weight-read floor.

    python benchmarks/bench_quant_kernels.py [--device cuda] [--tokens 1 16 256] [--sweep] [--json out.json]

Layers (d = 2048, E = 4096, I = 6144, V = 128K): in_proj 2048→8192, x_proj 4096→160, out_proj 4096→2048,
fc1 2048→12288, fc2 6144→2048, lm_head 2048→128000 (bf16 in the default recipe; here to see a wide GEMV).
Variants: bf16 `nn.Linear`; INT4 g128 `QuantizedLinear` with backend "int4mm" (torch's INT4 kernels: tinygemm
on CUDA, `_weight_int4pack_mm_for_cpu` on CPU), "triton" (our weight-streaming GEMV `kernels/triton_gemv.py` for
≤ 16 tokens, dequantize + dense matmul above) and "dequant"; FP8 `Float8Linear` with backend "scaled_mm" (FP8 GPUs,
activations quantized per token), "triton" (weight-only GEMV for ≤ 16 tokens) and "emulated". The slow
reference variants ("dequant", "emulated") skip the LM head.

Napkin math: at decode (1 token) a linear reads its whole weight once, so time ≥ bytes read / memory bandwidth
(H200 copy ≈ 4 TB/s, shared/NOTES.md): in_proj is 33.6 MB in bf16 → ≥ 8.4 µs, 8.8 MB in INT4 g128 (nibbles +
bf16 scales + zeros) → ≥ 2.2 µs. "GBps" = bytes read (the layout the kernel reads: tinygemm's int4pack and its
bf16 scales-and-offsets once the uint8 copy is released) / time. On CUDA each variant is timed as a CUDA graph of
20 calls, so launch overhead (a few µs per kernel, more than the INT4 floor) is excluded, cycling through copies of
the weight that add up to ≥ 240 MB (4× the L2) so that every call reads from HBM as in a decode step (until the
sixth session the same weight was called 20 times: layers under ~50 MB then ran from L2); on CPU with plain calls.

`--sweep` (CUDA): the Triton GEMVs at 1 token over a grid of launch shapes (rows per program × columns per tile ×
split-K × warps, and the default without its register prefetch) per layer, against the default
(`triton_gemv.default_config`); prints the best per layer.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
from torch import nn

from moai_lib.quant import Float8Linear, QuantizedLinear
from moai_lib.quant import primitives as P
from moai_lib.quant.fp8 import fp8_gpu_problem

SHAPES = {"in_proj": (2048, 8192), "x_proj": (4096, 160), "out_proj": (4096, 2048), "fc1": (2048, 12288),
          "fc2": (6144, 2048), "lm_head": (2048, 128000)}
COPY_BANDWIDTH = {"cuda": 4.0e12}  # bytes/s, measured copy on the H200 (shared/NOTES.md)
CALLS_PER_GRAPH = 20
ROTATE_BYTES = 240_000_000  # 4× the H200's 60 MB L2
SLOW = ("int4_g128_dequant", "fp8_emulated")  # reference variants: not on the LM head


def read_bytes(module: nn.Module) -> int:
    """Bytes one call reads: parameters and buffers, or for an INT4 layer whose uint8 copy was released (CUDA)
    the layout it reads instead (`QuantizedLinear.read_tensors`)."""
    if isinstance(module, QuantizedLinear):
        tensors = module.read_tensors()
    else:
        tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def copies_for(nbytes: int) -> int:
    """Weight copies to cycle through so that one graph of calls reads ≥ ROTATE_BYTES (4× the H200's L2): each
    call then streams its weight from HBM, as in a decode step, instead of finding it in L2."""
    return max(1, min(CALLS_PER_GRAPH, -(-ROTATE_BYTES // nbytes)))


def time_call(fns, x: torch.Tensor, device: str) -> float:
    """Median seconds per call; `fns` is one callable or a list over distinct weight copies, called in turn."""
    fns = fns if isinstance(fns, list) else [fns]
    if device == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                for fn in fns:
                    fn(x)  # warm-up: builds the kernel layouts, compiles the Triton kernels, before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(CALLS_PER_GRAPH):
                fns[i % len(fns)](x)
        samples = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / CALLS_PER_GRAPH)
        return statistics.median(samples)
    fn = fns[0]
    fn(x)
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn(x)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def variants(linear: nn.Linear, device: str, name: str) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {"bf16": linear}
    backends = ["int4mm", "dequant"] + (["triton"] if device == "cuda" else [])
    for backend in backends:
        module = QuantizedLinear.from_float(linear, 4, 128, symmetric=False)
        module.backend = backend
        out[f"int4_g128_{backend}"] = module
    can_fp8 = device == "cuda" and fp8_gpu_problem(torch.cuda.get_device_name(),
                                                   torch.cuda.get_device_capability()) is None
    if can_fp8:
        out["fp8_scaled_mm"] = Float8Linear.from_float(linear, backend="scaled_mm")
        out["fp8_triton"] = Float8Linear.from_float(linear, backend="triton")
    out["fp8_emulated"] = Float8Linear.from_float(linear, backend="emulated")
    return {k: v for k, v in out.items() if not (name == "lm_head" and k in SLOW)}


def sweep(linear: nn.Linear, name: str, device: str = "cuda") -> list[dict]:
    """The Triton GEMVs at 1 token over launch shapes; rows with the config, µs and GB/s."""
    from moai_lib.kernels import triton_gemv as G

    k, n = linear.in_features, linear.out_features
    int4 = QuantizedLinear.from_float(linear, 4, 128, symmetric=False)
    cols = G.Int4Columns.from_rows(int4.qweight, int4.scales, int4.zeros, 128)
    fp8 = Float8Linear.from_float(linear)
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    int4_bytes = sum(t.numel() * t.element_size() for t in cols.tensors())
    int4_copies = [cols] + [G.Int4Columns(*(t.clone() for t in cols.tensors()), 128)
                            for _ in range(copies_for(int4_bytes) - 1)]
    fp8_copies = [fp8] + [copy.deepcopy(fp8) for _ in range(copies_for(read_bytes(fp8)) - 1)]
    kernels = {
        "int4_g128_triton": ([lambda v, c, w=w: G.int4_gemv(v, w, None, c) for w in int4_copies], int4_bytes,
                             lambda v: G.int4_gemv_ref(v, int4.qweight, int4.scales, int4.zeros, 128)),
        "fp8_triton": ([lambda v, c, f=f: G.fp8_gemv(v, f.qweight, f.weight_scale, None, c) for f in fp8_copies],
                       read_bytes(fp8), lambda v: G.fp8_gemv_ref(v, fp8.qweight, fp8.weight_scale)),
    }
    rows = []
    for kind, (fns, nbytes, ref_fn) in kernels.items():
        ref = ref_fn(x)
        default = G.default_config("int4" if kind.startswith("int4") else "fp8", 1, n, k, x.device)
        configs = {default}
        if kind.startswith("int4"):  # block_n output columns (16-byte vectors of 4) × block_k input columns
            shapes = [(bn, bk, w) for bn, bk, w in itertools.product((32, 64, 128, 256), (128, 256, 512), (4, 8))
                      if bn * bk // 8 >= 256 * w]  # at least 8 words per thread
        else:  # block_n rows × block_k columns
            shapes = [(bn, bk, 4) for bn, bk in itertools.product((8, 16, 32), (256, 512, 1024))]
            shapes += [(16, 512, 8), (32, 512, 8), (32, 1024, 8)]  # 8 warps only for the larger tiles
        for block_n, block_k, warps in shapes:
            split = G.split_k_for(n, k, block_n, block_k, x.device)  # the default rule for this tile
            for s in sorted({max(1, split // 2), split, 2 * split}):
                configs.add(G.GemvConfig(block_n, block_k, s, warps))
        configs.add(dataclasses.replace(default, prefetch=False))  # what the register prefetch buys
        for cfg in sorted(configs, key=lambda c: (c.block_n, c.block_k, c.split_k, c.num_warps, c.prefetch)):
            if cfg.split_k > -(-k // cfg.block_k):
                continue
            try:
                quality = P.sqnr(ref, fns[0](x, cfg).float())  # validate each launch shape before timing it
                seconds = time_call([lambda v, c=cfg, f=f: f(v, c) for f in fns], x, device)
            except Exception as exc:  # a shape Triton cannot compile (registers, shared memory)
                rows.append({"layer": name, "variant": kind, "config": cfg.__dict__, "error": str(exc)[:200]})
                continue
            row = {"layer": name, "variant": kind, "config": cfg.__dict__, "default": cfg == default,
                   "us": round(seconds * 1e6, 2), "sqnr_db": round(quality, 1),
                   "GBps": round(nbytes / seconds / 1e9, 1),
                   "of_copy_bw": round(nbytes / seconds / COPY_BANDWIDTH.get(device, float("inf")), 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--layers", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="CUDA: sweep the Triton GEMV launch shapes at 1 token")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, sweep_rows = [], []
    with torch.no_grad():
        for name in args.layers.split(","):
            k, n = SHAPES[name]
            linear = nn.Linear(k, n, bias=False, device=args.device, dtype=torch.bfloat16)
            for variant, module in variants(linear, args.device, name).items():
                for m in args.tokens:
                    x = torch.randn(m, k, device=args.device, dtype=torch.bfloat16)
                    ref = linear(x).float()
                    quality = P.sqnr(ref, module(x).float())  # validate before timing
                    nbytes = read_bytes(module)
                    copies = [module] + [copy.deepcopy(module) for _ in range(copies_for(nbytes) - 1)]
                    seconds = time_call(copies if args.device == "cuda" else module, x, args.device)
                    nbytes = read_bytes(module)  # after the first call: the layout a released layer reads
                    row = {"layer": name, "shape": f"{k}x{n}", "variant": variant, "tokens": m,
                           "us": round(seconds * 1e6, 2), "sqnr_db": round(quality, 1),
                           "read_MB": round(nbytes / 1e6, 2), "GBps": round(nbytes / seconds / 1e9, 1)}
                    if args.device in COPY_BANDWIDTH:
                        row["floor_us"] = round(nbytes / COPY_BANDWIDTH[args.device] * 1e6, 2)
                        row["of_copy_bw"] = round(nbytes / seconds / COPY_BANDWIDTH[args.device], 3)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            if args.sweep and args.device == "cuda":
                sweep_rows += sweep(linear, name)
            del linear
            if args.device == "cuda":
                torch.cuda.empty_cache()
    summary = {}
    for r in rows:
        summary.setdefault((r["layer"], r["tokens"]), {})[r["variant"]] = f"{r['us']:.1f} ({r['GBps']:.0f})"
    names = sorted({r["variant"] for r in rows})
    print("\nµs per call (GB/s read)\n\n| layer | tokens | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for (layer, m), cells in summary.items():
        print(f"| {layer} | {m} | " + " | ".join(cells.get(v, "-") for v in names) + " |")
    if sweep_rows:
        print("\nTriton GEMV launch-shape sweep at 1 token: default vs best (µs, GB/s)")
        for (layer, kind), group in itertools.groupby(sweep_rows, key=lambda r: (r["layer"], r["variant"])):
            ok = [r for r in group if "us" in r]
            if ok:
                best = min(ok, key=lambda r: r["us"])
                default = next((r for r in ok if r["default"]), None)
                print(f"{layer:9s} {kind:17s} default {default['us'] if default else '-'} µs "
                      f"({default['GBps'] if default else '-'} GB/s)  best {best['us']} µs ({best['GBps']} GB/s) "
                      f"{best['config']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv),
                       "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                       "torch": torch.__version__, "rows": rows, "sweep": sweep_rows}, f, indent=1)


if __name__ == "__main__":
    main()
