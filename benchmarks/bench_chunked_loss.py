"""Peak memory and time of the causal-LM loss: full fp32 logits vs `chunked_causal_lm_loss`.

Question: how much memory does the chunked cross-entropy save at a 128K vocabulary, and what does it cost?

Each variant runs forward + backward of LM head + loss on the same hidden states, in a fresh subprocess
(CPU: peak resident set size from getrusage; CUDA: torch.cuda.max_memory_allocated). The run first checks
that all variants give the same loss and gradients, then times them.

    python benchmarks/bench_chunked_loss.py [--device cpu|cuda] [--batch 2 --seq 1024 --hidden 512 --vocab 128000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from moai_lib.model.loss import chunked_causal_lm_loss  # noqa: E402


def make_inputs(args, device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch, args.seq, args.hidden, generator=g).to(device).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * args.hidden ** -0.5).to(device).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    return hidden, weight, labels


def full_loss(hidden, weight, labels):
    logits = F.linear(hidden, weight).float()  # (B, L, V) fp32: the tensor the chunked loss avoids
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def run_variant(args) -> dict:
    """Runs in its own process so that the peak memory belongs to this variant alone."""
    device = torch.device(args.device)
    hidden, weight, labels = make_inputs(args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        if args.variant == "full":
            loss = full_loss(hidden, weight, labels)
        else:
            loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=int(args.variant.split("=")[1]))
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": args.variant, "loss": loss.item(), "grad_h_norm": hidden.grad.norm().item(),
            "grad_w_norm": weight.grad.norm().item(), "peak_extra_bytes": peak,
            "median_s": sorted(times)[len(times) // 2]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="full,chunk=1024,chunk=512,chunk=256")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "chunked_loss.json"))
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("device", "batch", "seq", "hidden", "vocab", "repeats")]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    ref = rows[0]
    for r in rows[1:]:  # validate before reporting
        for key in ("loss", "grad_h_norm", "grad_w_norm"):
            if abs(r[key] - ref[key]) > 1e-4 * max(1.0, abs(ref[key])):
                raise SystemExit(f"{r['variant']} disagrees with full on {key}: {r[key]} vs {ref[key]}")
    logits_gib = args.batch * args.seq * args.vocab * 4 / 2**30
    print(f"B={args.batch} L={args.seq} d={args.hidden} V={args.vocab} on {args.device}; "
          f"full fp32 logits alone = {logits_gib:.2f} GiB; all variants agree on loss and gradients\n")
    print("| variant | peak extra memory (GiB) | vs full | fwd+bwd time (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['peak_extra_bytes'] / 2**30:.2f} | "
              f"{r['peak_extra_bytes'] / ref['peak_extra_bytes']:.2f}x | {r['median_s']:.3f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                               "torch": torch.__version__,
                               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
                   "command": " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
                   "shape": {"batch": args.batch, "seq": args.seq, "hidden": args.hidden, "vocab": args.vocab},
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
