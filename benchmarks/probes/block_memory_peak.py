"""Probe: what is alive at the peak of one Mamba block's forward+backward (d=2048, B=1, bf16, the block of
`bench_block_vs_attention.py`)? Records the CUDA caching allocator's history
(`torch.cuda.memory._record_memory_history`) over one fwd+bwd, replays its alloc/free events to find the peak,
and prints the tensors alive there with the source line (ours or torch's) that allocated each. Same for the
attention block, for comparison.

    python benchmarks/probes/block_memory_peak.py [--length 32768] [--checkpoint-every 0,256]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from bench_block_vs_attention import AttentionBlock, mamba_config  # noqa: E402

from moai_lib.model.mamba import MoaiMambaForCausalLM  # noqa: E402

MiB = 2 ** 20


def origin(frames) -> str:
    """The innermost frame in our code (moai_lib or the benchmark), else the innermost Python frame."""
    for f in frames:
        name = f.get("filename", "")
        if "moai_lib" in name or "bench" in name:
            return f"{os.path.basename(name)}:{f.get('line')} {f.get('name')}"
    for f in frames:
        if f.get("filename", "").endswith(".py"):
            return f"{os.path.basename(f['filename'])}:{f.get('line')} {f.get('name')}"
    return "?"


def peak_breakdown(fn) -> dict:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak = {}, 0, 0, {}
    for ev in snap["device_traces"][0]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], origin(ev.get("frames", [])))
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif ev["action"] in ("free_requested",) and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    groups = defaultdict(lambda: [0, 0])
    for size, where in at_peak.values():
        groups[where][0] += size
        groups[where][1] += 1
    return {"before_mib": base / MiB, "peak_above_before_mib": peak / MiB,
            "alive_at_peak": sorted(((w, s / MiB, n) for w, (s, n) in groups.items()), key=lambda r: -r[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--checkpoint-every", default="0,256")
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(1, args.length, args.d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    blocks = {}
    for every in (int(k) for k in args.checkpoint_every.split(",")):
        model = MoaiMambaForCausalLM(mamba_config(args.d, "triton", every)).to(dev, torch.bfloat16)
        blocks[f"mamba (ours, checkpoint_every={every})"] = model.backbone.layers[0]
    blocks["attention (SDPA)"] = AttentionBlock(args.d, 16, 128).to(dev, torch.bfloat16)
    for name, block in blocks.items():
        def step(block=block):
            block(x).backward(dy)
            x.grad = None
        step()  # warm-up (compiles; the caching allocator holds its blocks)
        r = peak_breakdown(step)
        print(f"\n== {name}, L={args.length}: {r['before_mib']:.0f} MiB before the step (x, dy, weights), "
              f"peak {r['peak_above_before_mib']:.0f} MiB above it")
        for where, mib, n in r["alive_at_peak"]:
            if mib >= 1:
                print(f"  {mib:8.0f} MiB  {n:3d}x  {where}")


if __name__ == "__main__":
    main()
