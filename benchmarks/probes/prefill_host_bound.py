"""Probe, the code that ran on the H200 (reformatted only; fourth session, 14:52 UTC; cited in BENCHMARKS.md
sections 1 and 4): is the 2K-prompt prefill of the 370m preset host-bound? Eager wall time vs the CPU time to
enqueue it vs a CUDA-graph replay of the layers, and a cProfile of the eager forward (Triton's `JITFunction.run`
~60 µs per launch there). Run from the repository root: `python benchmarks/probes/prefill_host_bound.py`."""

import cProfile
import io
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.getcwd())
import torch

from moai_lib.config import get_mamba_config
from moai_lib.model.mamba import MoaiMambaForCausalLM

dev = torch.device("cuda")
cfg = get_mamba_config("370m", kernel_backend="triton")
print("layers", cfg.num_hidden_layers, "d", cfg.hidden_size, "I", cfg.intermediate_size)
with torch.device(dev):
    model = MoaiMambaForCausalLM(cfg).to(torch.bfloat16).eval()
prompt = torch.randint(0, cfg.vocab_size, (1, 2048), device=dev)


def fwd():
    return model(input_ids=prompt, use_cache=True, logits_to_keep=1).logits


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
    print(f"eager wall {t(fwd):.2f} ms")
    # CPU time to enqueue (no sync):
    torch.cuda.synchronize()
    s = time.perf_counter()
    fwd()
    e = time.perf_counter()
    torch.cuda.synchronize()
    print(f"enqueue-only CPU {(e - s) * 1e3:.2f} ms")
    # a graph of the layers only (the whole forward syncs in check_input_ids)
    x = model.backbone.embedding(prompt).float()
    layers = model.backbone.layers

    def body():
        h = x
        for layer in layers:
            h = layer(h)
        return h

    print(f"layers eager (no cache) wall {t(body):.2f} ms")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    print(f"layers graph replay {t(g.replay):.2f} ms")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(5):
        fwd()
    torch.cuda.synchronize()
    pr.disable()
    sio = io.StringIO()
    pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(30)
    print(sio.getvalue()[:6000])
