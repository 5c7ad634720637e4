"""Where the GPU time goes: torch.profiler kernel tables for the three places where we trail mamba-ssm.

Question: in (a) one Mamba block's forward+backward at d=2048, L=32K, B=1, (b) one training step of the 370m
preset (B=8, L=2048, autocast bf16, fused AdamW) and (c) one decode step of the 370m preset at batch 1 (20
replays of the CUDA graph, and one eager step), which kernels take the time? Prints the profiler's table
(sorted by CUDA time) for each; BENCHMARKS.md quotes the totals. No timing claims: profiling adds overhead.

    python benchmarks/profile_gpu.py > benchmarks/results/profile_gpu.txt
"""

from __future__ import annotations

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from moai_lib.config import MoaiMambaConfig, get_mamba_config  # noqa: E402
from moai_lib.model.generate import CudaGraphDecoder  # noqa: E402
from moai_lib.model.mamba import MoaiMambaForCausalLM  # noqa: E402


def table(name: str, fn, repeats: int) -> None:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    print(f"\n===== {name} (x{repeats})")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))


def block_step(device) -> None:
    cfg = MoaiMambaConfig(vocab_size=256, hidden_size=2048, intermediate_size=0, num_hidden_layers=1,
                          kernel_backend="triton", residual_in_fp32=False)
    block = MoaiMambaForCausalLM(cfg).to(device, torch.bfloat16).backbone.layers[0]
    x = torch.randn(1, 32768, 2048, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        block(x).backward(dy)
        x.grad = None
    table("block d2048 L32K fwd+bwd", step, 2)


def train_step(device, cfg) -> None:
    with torch.device(device):
        model = MoaiMambaForCausalLM(cfg)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (8, 2048), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    table("train step 370m B8 L2048", step, 2)


@torch.inference_mode()
def decode_step(device, cfg) -> None:
    with torch.device(device):
        model = MoaiMambaForCausalLM(cfg).to(torch.bfloat16).eval()
    out = model(input_ids=torch.randint(0, cfg.vocab_size, (1, 16), device=device), use_cache=True,
                logits_to_keep=1)
    decoder = CudaGraphDecoder(model, out.cache)
    token = out.logits[:, -1].argmax(-1, keepdim=True)

    def replays():
        for _ in range(20):
            decoder(token)
    table("decode 370m B1: 20 graph replays", replays, 1)
    table("decode 370m B1: 1 eager step",
          lambda: model(input_ids=token, cache=out.cache, use_cache=True, logits_to_keep=1), 1)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    cfg = get_mamba_config("370m", kernel_backend="triton")
    block_step(device)
    torch.cuda.empty_cache()
    train_step(device, cfg)
    torch.cuda.empty_cache()
    decode_step(device, cfg)


if __name__ == "__main__":
    main()
