"""Quantized linear layers at the `2b` preset's shapes: validate against bf16, then time, then compare with
the weight-read floor.

    python benchmarks/bench_quant_kernels.py [--device cuda] [--tokens 1 16 256] [--json out.json]

Layers (d = 2048, E = 4096, I = 6144): in_proj 2048→8192, out_proj 4096→2048, fc1 2048→12288, fc2 6144→2048.
Variants: bf16 `nn.Linear`; INT4 g128 `QuantizedLinear` with backend "int4mm" (torch's INT4 kernels: tinygemm
on CUDA, `_weight_int4pack_mm_for_cpu` on CPU) and "dequant";
FP8 `Float8Linear` with backend "scaled_mm" (FP8 GPUs) and "emulated".

Napkin math: at decode (1 token) a linear reads its whole weight once, so time ≥ weight bytes / memory
bandwidth (H200 copy ≈ 4 TB/s, shared/NOTES.md): in_proj is 33.6 MB in bf16 → ≥ 8.4 µs, 8.4 MB in INT4 → ≥ 2.1 µs.
On CUDA each variant is timed as a CUDA graph of 20 calls, so launch overhead (a few µs per kernel, more than
the INT4 floor) is excluded; on CPU with plain calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from moai_lib.quant import Float8Linear, QuantizedLinear
from moai_lib.quant import primitives as P
from moai_lib.quant.fp8 import fp8_gpu_problem

SHAPES = {"in_proj": (2048, 8192), "out_proj": (4096, 2048), "fc1": (2048, 12288), "fc2": (6144, 2048)}
COPY_BANDWIDTH = {"cuda": 4.0e12}  # bytes/s, measured copy on the H200 (shared/NOTES.md)
CALLS_PER_GRAPH = 20


def storage_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def time_call(fn, x: torch.Tensor, device: str) -> float:
    """Median seconds per call."""
    if device == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn(x)  # warm-up, builds the int4mm layout before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(CALLS_PER_GRAPH):
                fn(x)
        samples = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / CALLS_PER_GRAPH)
        return statistics.median(samples)
    fn(x)
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn(x)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def variants(linear: nn.Linear, device: str) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {"bf16": linear}
    for backend in ("int4mm", "dequant"):
        module = QuantizedLinear.from_float(linear, 4, 128, symmetric=False)
        module.backend = backend
        out[f"int4_g128_{backend}"] = module
    can_fp8 = device == "cuda" and fp8_gpu_problem(torch.cuda.get_device_name(),
                                                   torch.cuda.get_device_capability()) is None
    if can_fp8:
        out["fp8_scaled_mm"] = Float8Linear.from_float(linear, backend="scaled_mm")
    out["fp8_emulated"] = Float8Linear.from_float(linear, backend="emulated")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for name, (k, n) in SHAPES.items():
            linear = nn.Linear(k, n, bias=False, device=args.device, dtype=torch.bfloat16)
            for variant, module in variants(linear, args.device).items():
                for m in args.tokens:
                    x = torch.randn(m, k, device=args.device, dtype=torch.bfloat16)
                    ref = linear(x).float()
                    quality = P.sqnr(ref, module(x).float())  # validate before timing
                    seconds = time_call(module, x, args.device)
                    weight_bytes = storage_bytes(module)
                    row = {"layer": name, "shape": f"{k}x{n}", "variant": variant, "tokens": m,
                           "us": round(seconds * 1e6, 2), "sqnr_db": round(quality, 1),
                           "weight_MB": round(weight_bytes / 1e6, 2),
                           "weight_GBps": round(weight_bytes / seconds / 1e9, 1)}
                    if args.device in COPY_BANDWIDTH:
                        row["floor_us"] = round(weight_bytes / COPY_BANDWIDTH[args.device] * 1e6, 2)
                        row["of_copy_bw"] = round(weight_bytes / seconds / COPY_BANDWIDTH[args.device], 3)
                    rows.append(row)
                    print(json.dumps(row))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
