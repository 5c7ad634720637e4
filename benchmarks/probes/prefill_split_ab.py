"""Probe, the code that ran on the H200 (reformatted only; fourth session, 15:26 UTC; cited in BENCHMARKS.md
section 4): the 2K-prompt TTFT of the 370m preset (B=1, use_cache, logits_to_keep=1) with the scan split over L
from L=2048 vs from L=4096 (`triton_scan_seg._MIN_SPLIT_LENGTH`, patched in-process, each twice), and the GPU-only
time of the layers (a CUDA graph of them). Run from the repository root:
`python benchmarks/probes/prefill_split_ab.py`."""

import os
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())
import torch

from moai_lib.config import get_mamba_config
from moai_lib.kernels import triton_scan_seg as seg
from moai_lib.model.mamba import MoaiMambaForCausalLM

dev = torch.device("cuda")
cfg = get_mamba_config("370m", kernel_backend="triton")
with torch.device(dev):
    model = MoaiMambaForCausalLM(cfg).to(torch.bfloat16).eval()
prompt = torch.randint(0, cfg.vocab_size, (1, 2048), device=dev)


def t(f, n=20):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        s = time.perf_counter()
        f()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - s) * 1e3)
    return statistics.median(ts)


with torch.inference_mode():
    x = model.backbone.embedding(prompt).float()
    for min_split in (2048, 4096, 2048, 4096):
        seg._MIN_SPLIT_LENGTH = min_split
        ttft = t(lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1))

        def body():
            h = x
            for layer in model.backbone.layers:
                h = layer(h)
            return h

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                body()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        print(
            f"split from L={min_split}: TTFT {ttft:.2f} ms, layers eager {t(body):.2f} ms, "
            f"layers graph {t(g.replay):.2f} ms"
        )
