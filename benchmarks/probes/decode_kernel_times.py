"""Probe: where does a batch-1 decode step of the 2b preset spend its GPU time, per kernel, in bf16 and in the
quantized variants of `bench_quant_inference.py`? torch.profiler over graph-less steps (`decode_logits`, what a
CUDA-graph replay runs); per kernel name: launches and GPU µs per token, and the sum. The question behind it:
how much of the INT4 step is the weight GEMVs (which quantization shrinks) and how much the other kernels (which
it does not)?

    python benchmarks/probes/decode_kernel_times.py [--variants "bf16,int4 g128 (tinygemm)"]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from bench_quant_inference import VARIANTS, contiguous_inputs  # noqa: E402

from moai_lib.config import get_mamba_config  # noqa: E402
from moai_lib.model.generate import decode_logits  # noqa: E402
from moai_lib.model.mamba import MoaiMambaForCausalLM  # noqa: E402
from moai_lib.quant import QuantizedLinear, quantize_  # noqa: E402


def kernel_table(model, prompt, steps: int = 5) -> dict:
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(2):
        decode_logits(model, token, out.cache)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decode_logits(model, token, out.cache)
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += 1
            per[e.name][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    rows = sorted(((n, c / steps, us / steps) for n, (c, us) in per.items()), key=lambda r: -r[2])
    return {"kernels": sum(r[1] for r in rows), "gpu_us": sum(r[2] for r in rows), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="2b")
    p.add_argument("--variants", default="bf16,int4 g128 (tinygemm),fp8 e4m3 (triton gemv)")
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.set_grad_enabled(False)  # not inference_mode: the int4 layers' layout cache keys on version counters
    config = get_mamba_config(args.preset, kernel_backend="triton")
    torch.manual_seed(0)
    with torch.device(dev):
        base = MoaiMambaForCausalLM(config).to(torch.bfloat16).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 32), device=dev)
    for name in args.variants.split(","):
        model = base
        if VARIANTS[name] is not None:
            qcfg, filter_fn, backend = VARIANTS[name]
            model = copy.deepcopy(base)
            model = quantize_(model, qcfg, filter_fn=filter_fn)
            if backend:
                for m in model.modules():
                    if isinstance(m, QuantizedLinear):
                        m.backend = backend
            contiguous_inputs(model)
        t = kernel_table(model, prompt)
        print(f"\n== {name}: {t['kernels']:.0f} kernels, {t['gpu_us']:.0f} µs of kernel time per token")
        for kname, count, us in t["rows"][:25]:
            print(f"  {us:8.1f} µs  {count:5.0f}x  {kname[:110]}")
        if model is not base:
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
