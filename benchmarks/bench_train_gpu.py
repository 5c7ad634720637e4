"""Training throughput on the GPU: tokens/s and MFU of our model vs mamba-ssm's `MambaLMHeadModel` of the same
shape.

Question: at L=2048 in bf16, how many tokens/s does a full training step (forward, loss, backward, AdamW) of the
130m / 370m / 1b presets reach with our kernels, against mamba-ssm's model with the same architecture
(`d_intermediate` = our MLP width, `rms_norm`, Mamba-1 mixer; `convert.config_to_mamba_ssm`) and our weights?

Recipe for both: fp32 master weights, `torch.autocast(bfloat16)`, fused AdamW (lr 1e-4), batch B sequences of L
tokens. Ours computes the chunked cross-entropy (`model(input_ids, labels=...)`); mamba-ssm's model returns full
logits and the loss is `F.cross_entropy` on them (its training scripts do the same).

MFU = model FLOPs per second / 989 TFLOP/s (H200 dense bf16 datasheet; 792 measured on the machine). Model FLOPs
per token = 6·N (N = all parameters, the tied embedding counted once: it is the LM head's matmul) + the scan's
21·E·N_state per layer (7 flops per state element forward: Δ·A, exp, Δ·B·u, the update's multiply-add, C·h;
twice that backward), which is < 1% of 6·N here. Recomputation (our chunked loss recomputes the LM head's logits
in the backward) is not counted: MFU counts useful work only.

First it validates: the two models' losses on the same batch with the same weights agree (relative 2e-2 under
autocast). Then it times `--steps` steps after `--warmup` (median, CUDA events) and records peak memory.

With `--checkpoint-every K` a row 'ours (triton, checkpoint every K)' joins: the same model with
`scan_checkpoint_every=K` (the scan saves its state every K steps instead of every 4: less memory, one more
forward inside the backward).

    python benchmarks/bench_train_gpu.py [--presets 130m,370m,1b] [--batch 8] [--length 2048] [--checkpoint-every 256]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from gpu_common import (
    BF16_MEASURED_FLOPS,
    BF16_PEAK_FLOPS,
    RESULTS,
    GiB,
    copy_weights,
    mamba_ssm_lm,
    mamba_ssm_or_reason,
    time_ms,
    write_json,
)

from moai_lib.config import get_mamba_config
from moai_lib.model.mamba import MoaiMambaForCausalLM


def flops_per_token(config, n_params: int) -> float:
    scan = 21 * config.d_inner * config.state_size * config.num_hidden_layers
    return 6 * n_params + scan


def ours_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def theirs_loss(model, ids, vocab):
    logits = model(ids).logits[:, :-1, :vocab]
    return F.cross_entropy(logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1))


def train_step_fn(model, loss_fn, ids):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="130m,370m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--tol", type=float, default=2e-2)
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also time ours with scan_checkpoint_every=K (sparse scan checkpoints: less memory)")
    p.add_argument("--out", default=os.path.join(RESULTS, "train_gpu.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    ms = mamba_ssm_or_reason()
    rows = []
    for preset in args.presets.split(","):
        config = get_mamba_config(preset, kernel_backend="triton")
        torch.manual_seed(0)
        with torch.device(device):
            ours = MoaiMambaForCausalLM(config)
        ours.train()
        n_params = sum(p.numel() for p in ours.parameters())  # tied weights counted once
        ids = torch.randint(0, config.vocab_size, (args.batch, args.length), device=device)
        models = {"ours (triton)": (ours, ours_loss)}
        if args.checkpoint_every:
            def sparse_loss(model, x, every=args.checkpoint_every):  # same model and weights, sparse checkpoints
                model.config.scan_checkpoint_every = every
                try:
                    return ours_loss(model, x)
                finally:
                    model.config.scan_checkpoint_every = 0
            models[f"ours (triton, checkpoint every {args.checkpoint_every})"] = (ours, sparse_loss)
        check = {}
        if isinstance(ms, str):
            check["mamba-ssm"] = ms
        else:
            theirs = mamba_ssm_lm(config, ms, device)
            copy_weights(ours, theirs)
            theirs.train()
            models["mamba-ssm"] = (theirs, lambda m, x, v=config.vocab_size: theirs_loss(m, x, v))
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                a, b = ours_loss(ours, ids).item(), theirs_loss(theirs, ids, config.vocab_size).item()
            check["loss_ours"], check["loss_mamba_ssm"] = a, b
            check["relative_diff"] = abs(a - b) / abs(b)
            print(f"{preset}: validate loss ours {a:.5f} vs mamba-ssm {b:.5f}", flush=True)
        fpt = flops_per_token(config, n_params)
        for name, (model, loss_fn) in models.items():
            row = {"preset": preset, "model": name, "params": n_params, "batch": args.batch, "L": args.length,
                   "flops_per_token": fpt}
            if name == "mamba-ssm" and not check["relative_diff"] <= args.tol:
                row["error"] = f"validation failed: loss differs by {check['relative_diff']:.2e}"
            else:
                try:
                    torch.cuda.reset_peak_memory_stats()
                    ms_step = time_ms(train_step_fn(model, loss_fn, ids), warmup=args.warmup, repeats=args.steps)
                    tps = args.batch * args.length / (ms_step / 1e3)
                    row.update(ms_per_step=ms_step, tokens_per_s=tps, mfu=tps * fpt / BF16_PEAK_FLOPS,
                               mfu_vs_measured_matmul=tps * fpt / BF16_MEASURED_FLOPS,
                               peak_gib=torch.cuda.max_memory_allocated() / GiB)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(row, flush=True)
            rows.append(row)
            model.zero_grad(set_to_none=True)
        rows[-1]["validation"] = check
        del models, ours
        if not isinstance(ms, str):
            del theirs
        torch.cuda.empty_cache()
    print(f"\nB={args.batch} L={args.length}, autocast bf16, fused AdamW; MFU vs 989 TFLOP/s\n")
    print("| preset | params | model | ms/step | tokens/s | vs mamba-ssm | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    anchor = {r["preset"]: r["tokens_per_s"] for r in rows if r["model"] == "mamba-ssm" and "tokens_per_s" in r}
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"| {r['preset']} | {r['params'] / 1e6:.0f}M | {r['model']} | {r.get('error', '')[:60]} | | | | |")
            continue
        vs = f"{r['tokens_per_s'] / anchor[r['preset']]:.2f}x" if r["preset"] in anchor else "-"
        print(f"| {r['preset']} | {r['params'] / 1e6:.0f}M | {r['model']} | {r['ms_per_step']:.1f} | "
              f"{r['tokens_per_s'] / 1e3:.1f}K | {vs} | {r['mfu']:.1%} | {r['peak_gib']:.1f} |")
    write_json(args.out, {"recipe": "fp32 master weights, autocast bf16, fused AdamW",
                          "flops": "6*N + 21*E*N_state*layers per token; MFU vs 989e12",
                          "mamba_ssm": ms if isinstance(ms, str) else "available", "rows": rows})


if __name__ == "__main__":
    main()
