"""One Mamba block vs one attention block of the same width on the GPU: forward+backward time and peak memory.

Question: from which context length is our Mamba block (RMSNorm → Mamba-1 mixer → residual add, d=2048,
E=4096, N=16; Triton scan) faster than an attention block (RMSNorm → fused QKV → causal SDPA with 16 heads of
128 → O projection → residual add, i.e. FlashAttention-2 through torch's SDPA), and how does its memory compare?
mamba-ssm's block (its fused `mamba_inner_fn` + fused add-norm) is timed beside them when its CUDA kernels import.
Neither block has an MLP: the MLP is the same in both architectures and would only dilute the difference.

First it validates: our block (Triton) vs the same block on the pure-torch scan, mamba-ssm's block loaded with our
weights vs ours, SDPA vs explicit softmax attention; outputs and input gradients at L=256. Then, per length,
B=1, bf16 weights and activations: median fwd+bwd ms (CUDA events) and the peak allocated memory of one
fwd+bwd (`torch.cuda.max_memory_allocated`, weights included; the 'activations' column is the part above what
was allocated before the step).

With `--checkpoint-every K` (a power of two >= 64) a row 'mamba (ours, checkpoint every K)' joins the table: the
same block and weights with `scan_checkpoint_every=K` (the scan saves its state every K steps instead of every 4:
less memory, one more forward in the backward; `moai_lib.kernels.triton_scan`), validated like ours.

With `--graphs` every block's forward+backward is also captured in one CUDA graph per length (static x and dy)
and replayed: the GPU's time without the host's launch overhead, which at B=1 and short L is most of an eager
step (each Triton launch costs tens of µs of Python). The replay's input gradient is checked against the eager
one (scaled error, same --tol) before it is timed. mamba-ssm's block is captured last: a failed capture leaves
the process unable to capture again.

    python benchmarks/bench_block_vs_attention.py [--lengths 512,2048,8192,32768] [--checkpoint-every 256] [--graphs]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from gpu_common import RESULTS, mamba_ssm_or_reason, peak_gib, scaled_error, time_ms, write_json
from torch import nn

from moai_lib.config import MoaiMambaConfig
from moai_lib.model.mamba import MoaiMambaForCausalLM, RMSNorm


class AttentionBlock(nn.Module):
    """RMSNorm → QKV → causal SDPA (H heads × h) → O → residual add. No RoPE: it is elementwise and cheap, and
    the question is the attention's cost."""

    def __init__(self, d: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, explicit: bool = False) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if explicit:  # the validation's reference
            scores = (q.float() @ k.float().transpose(-1, -2)) / self.head_dim ** 0.5
            mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            y = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.float()).to(x.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, h)
        return x + self.o(y.transpose(1, 2).reshape(batch, length, -1))


def mamba_config(d: int, backend: str, checkpoint_every: int = 0) -> MoaiMambaConfig:
    return MoaiMambaConfig(vocab_size=256, hidden_size=d, intermediate_size=0, num_hidden_layers=1,
                           kernel_backend=backend, residual_in_fp32=False, scan_checkpoint_every=checkpoint_every)


def ckpt_name(every: int) -> str:
    return f"mamba (ours, checkpoint every {every})"


def build_blocks(d: int, heads: int, head_dim: int, ms, device, checkpoint_every: int = 0) -> dict:
    torch.manual_seed(0)
    model = MoaiMambaForCausalLM(mamba_config(d, "triton")).to(device, torch.bfloat16)  # our init
    ours = model.backbone.layers[0]
    blocks = {"mamba (ours)": lambda x: ours(x)}
    if checkpoint_every:
        sparse = MoaiMambaForCausalLM(mamba_config(d, "triton", checkpoint_every)).to(device, torch.bfloat16)
        sparse.load_state_dict(model.state_dict())
        blocks[ckpt_name(checkpoint_every)] = lambda x: sparse.backbone.layers[0](x)
    ref_model = MoaiMambaForCausalLM(mamba_config(d, "torch")).to(device, torch.bfloat16)
    ref_model.load_state_dict(model.state_dict())
    blocks["_ours on torch scan"] = lambda x: ref_model.backbone.layers[0](x)
    if not isinstance(ms, str):
        from mamba_ssm.models.mixer_seq_simple import create_block

        theirs = create_block(d, d_intermediate=0, ssm_cfg={"layer": "Mamba1"}, rms_norm=True,
                              residual_in_fp32=False, fused_add_norm=True, layer_idx=0,
                              device=device, dtype=torch.bfloat16)
        missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"mamba-ssm block weights: missing {missing}, unexpected {unexpected}")

        def run_theirs(x):
            hidden, residual = theirs(x)
            return hidden + residual  # the block's output in our convention (residual stream after the mixer)

        blocks["mamba-ssm"] = run_theirs
    attn = AttentionBlock(d, heads, head_dim).to(device, torch.bfloat16)
    blocks["attention (SDPA)"] = lambda x: attn(x)
    blocks["_attention explicit"] = lambda x: attn(x, explicit=True)
    return blocks


def out_and_grad(fn, x, dy):
    x = x.detach().requires_grad_()
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), gx


def validate(blocks, d, device, length: int = 256, checkpoint_every: int = 0) -> dict:
    """Scaled errors of each timed block against its reference (bf16: a few 1e-3 expected)."""
    g = torch.Generator(device=device).manual_seed(1)
    # Tiny inputs: the blocks start with an RMSNorm, so their branch does not shrink with x, while the residual
    # (which would otherwise dominate y and hide the branch's error under bf16 rounding) does.
    x = (1e-2 * torch.randn(1, length, d, device=device, generator=g)).to(torch.bfloat16)
    dy = torch.randn(1, length, d, device=device, generator=g).to(torch.bfloat16)
    refs = {"mamba (ours)": "_ours on torch scan", "mamba-ssm": "mamba (ours)",
            "attention (SDPA)": "_attention explicit"}
    if checkpoint_every:
        refs[ckpt_name(checkpoint_every)] = "_ours on torch scan"
    errors = {}
    for name, ref in refs.items():
        if name not in blocks:
            continue
        y, gx = out_and_grad(blocks[name], x, dy)
        y_ref, gx_ref = out_and_grad(blocks[ref], x, dy)
        errors[name] = max(scaled_error(y, y_ref), scaled_error(gx, gx_ref))
        print(f"validate {name} vs {ref}: scaled error {errors[name]:.2e}", flush=True)
    return errors


def graphed_step(fn, x, dy):
    """(replay, x.grad after one replay): fn(x).backward(dy) captured in a CUDA graph after a warm-up on a side
    stream (the whole-network capture of torch's CUDA-graph notes)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            x.grad = None
            fn(x).backward(dy)
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x).backward(dy)  # x.grad is allocated in the graph's pool and rewritten by every replay
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay, x.grad.detach().clone()


def time_graphs(blocks, timed, lengths, d, device, tol) -> list:
    """Rows of replayed fwd+bwd graphs; each validated against the eager input gradient first."""
    rows = []
    order = sorted(timed, key=lambda n: n == "mamba-ssm")  # mamba-ssm last (see the module docstring)
    for length in lengths:
        g = torch.Generator(device=device).manual_seed(2)
        x = torch.randn(1, length, d, device=device, generator=g).to(torch.bfloat16).requires_grad_()
        dy = torch.randn(1, length, d, device=device, generator=g).to(torch.bfloat16)
        for name in order:
            row = {"block": name, "L": length, "graph": True}
            try:
                blocks[name](x).backward(dy)
                eager = x.grad.detach().clone()
                x.grad = None
                replay, replayed = graphed_step(blocks[name], x, dy)
                row["scaled_error_vs_eager"] = scaled_error(replayed, eager)
                if not row["scaled_error_vs_eager"] <= tol:
                    row["error"] = f"replay differs from eager: scaled error {row['scaled_error_vs_eager']:.2e}"
                else:
                    row["ms"] = time_ms(replay, warmup=2)
            except Exception as exc:  # capture not supported, out of memory
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            x.grad = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            print(row, flush=True)
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--lengths", default="512,2048,8192,32768")
    p.add_argument("--tol", type=float, default=5e-2)
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also time our block with the scan's sparse checkpoints every this many steps (0: no)")
    p.add_argument("--graphs", action="store_true", help="also time each block's fwd+bwd replayed as a CUDA graph")
    p.add_argument("--out", default=os.path.join(RESULTS, "block_vs_attention.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    ms = mamba_ssm_or_reason()
    mamba_config(args.d, "triton", args.checkpoint_every)  # a bad --checkpoint-every fails here, before any work
    blocks = build_blocks(args.d, args.heads, args.head_dim, ms, device, args.checkpoint_every)
    errors = validate(blocks, args.d, device, checkpoint_every=args.checkpoint_every)
    timed = [n for n in blocks if not n.startswith("_")]
    rows = []
    lengths = [int(v) for v in args.lengths.split(",")]
    for length in lengths:
        x = torch.randn(1, length, args.d, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        for name in timed:
            row = {"block": name, "L": length}
            if not errors.get(name, 0.0) <= args.tol:
                row["error"] = f"validation failed: scaled error {errors[name]:.2e} > {args.tol}"
            else:
                def step(fn=blocks[name], x=x, dy=dy):
                    fn(x).backward(dy)
                    x.grad = None
                try:
                    row["ms"] = time_ms(step, warmup=2)
                    row["peak_gib"], row["activations_gib"] = peak_gib(step)
                except Exception as exc:  # out of memory, kernel limits
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                torch.cuda.empty_cache()
            print(row, flush=True)
            rows.append(row)
    if args.graphs:
        rows += time_graphs(blocks, timed, lengths, args.d, device, args.tol)
    print(f"\nB=1, d={args.d}, attention {args.heads}x{args.head_dim}, bf16, fwd+bwd\n")
    print("| L | block | ms | vs attention | peak GiB | activations GiB |")
    print("|---|---|---|---|---|---|")
    attn = {(r["L"], r.get("graph", False)): r for r in rows if r["block"] == "attention (SDPA)" and "ms" in r}
    for r in rows:
        name = r["block"] + (" (CUDA graph)" if r.get("graph") else "")
        if "ms" not in r:
            print(f"| {r['L']} | {name} | {r['error'][:60]} | | | |")
            continue
        a = attn.get((r["L"], r.get("graph", False)))
        vs = f"{a['ms'] / r['ms']:.2f}x" if a else "-"
        mem = f"{r['peak_gib']:.2f} | {r['activations_gib']:.2f}" if "peak_gib" in r else "- | -"
        print(f"| {r['L']} | {name} | {r['ms']:.3f} | {vs} | {mem} |")
    write_json(args.out, {"shape": {"batch": 1, "d": args.d, "heads": args.heads, "head_dim": args.head_dim,
                                    "dtype": "bfloat16", "checkpoint_every": args.checkpoint_every,
                                    "graphs": args.graphs},
                          "mamba_ssm": ms if isinstance(ms, str) else "available",
                          "validation_scaled_error": errors, "rows": rows})


if __name__ == "__main__":
    main()
