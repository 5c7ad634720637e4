"""LM head + cross-entropy on the GPU: the fused Triton loss vs the checkpointed torch chunks vs full logits.

Question: at the 370m training shape (B·L = 8·2048 = 16384 tokens, d = 1024, V = 128000, bf16 autocast over an
fp32 weight), how much faster is `chunked_causal_lm_loss`'s fused path (`kernels/triton_ce.py`: 3 LM-head matmuls,
one Triton row kernel per chunk, no fp32 logits) than its checkpointed torch path (4 matmuls, fp32 logits and
torch's log_softmax backward), and than `F.cross_entropy` on full fp32 logits, in time and peak memory; and what
does it do to a whole training step?

1. Validate, at the full shape: the loss, d(hidden) and d(weight) of every variant against the current torch
   path (scaled errors; bf16 tolerance). A variant that fails is not timed.
2. Time forward+backward (CUDA events, median) and the forward alone under no_grad; record the peak memory above
   the inputs; matmul TFLOP/s counts the matmuls each variant runs (fused 3·2NVd, torch path 4·2NVd, full 3·2NVd).
   Fused rows for several tokens-per-chunk T (the default is 4·chunk_size = 2048 in bf16).
3. The row kernel alone on a (2048, V) bf16 chunk, for a few (block, num_warps): it moves 3 · 2 bytes per logit
   (read, read again, write the gradient), reported as GB/s against the ~4 TB/s copy bandwidth.
4. (`--train-step`, on by default) a full training step of the 370m model (fused AdamW, as
   bench_train_gpu.py), with the fused loss and with the torch path (switched by patching
   `moai_lib.model.loss.use_fused_loss`, which the model's `lm_head_outputs` consults).

    python benchmarks/bench_loss_gpu.py [--batch 8 --seq 2048 --hidden 1024 --vocab 128000] [--no-train-step]
                                        [--out benchmarks/results/loss_gpu.json]

Prints a Markdown table and writes the JSON (--out).
"""

from __future__ import annotations

import argparse
import os
import traceback

import torch
import torch.nn.functional as F
from gpu_common import BF16_MEASURED_FLOPS, HBM_BYTES_PER_S, RESULTS, GiB, peak_gib, scaled_error, time_ms, write_json

import moai_lib.model.loss as loss_module
from moai_lib.kernels import triton_ce
from moai_lib.model.loss import chunked_causal_lm_loss

TOL = {"loss": 1e-3, "dh": 2 ** -6, "dw": 2 ** -6}  # bf16 logits and gradients: a few bf16 ulps of the largest
CHUNK_SIZE = 512  # MoaiMambaForCausalLM.loss_chunk_size
FUSED_ROWS = (1024, 2048, 4096, 8192)  # tokens per chunk of the fused path (2048 = what chunk_size 512 gives)
DEVICE = "cuda"  # a module constant so that a CPU smoke run (Triton's interpreter, tiny shapes) can swap it
KERNEL_CONFIGS = ((4096, 8), (2048, 4), (2048, 8), (8192, 8), (8192, 16), (16384, 16))  # (block, num_warps)


def make_inputs(args):
    """hidden (B, L+1, d) ~ unit RMS like final-norm outputs, the fp32 weight at the model's init scale (0.02),
    labels with ~3% ignored: N = B·L counted rows after the shift."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(args.batch, args.seq + 1, args.hidden, device=DEVICE, generator=g)
    weight = 0.02 * torch.randn(args.vocab, args.hidden, device=DEVICE, generator=g)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=DEVICE, generator=g)
    labels[torch.rand(labels.shape, device=DEVICE, generator=g) < 0.03] = -100
    return hidden, weight, labels


def full_logits_loss(hidden, weight, labels):
    logits = F.linear(hidden[:, :-1], weight).float()  # (B, L, V) fp32: what the chunked losses avoid
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def fused_rows_loss(rows):
    def fn(hidden, weight, labels):
        targets = labels[:, 1:].reshape(-1)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return triton_ce.fused_linear_cross_entropy(h, weight, targets, chunk_rows=rows) / (targets != -100).sum()
    return fn


def variants() -> dict:
    """name -> (loss fn(hidden, weight, labels), LM-head matmuls it runs in forward+backward)."""
    out = {
        "torch chunked (current)": (lambda h, w, y: chunked_causal_lm_loss(h, w, y, chunk_size=CHUNK_SIZE,
                                                                           fused=False), 4),
        "fused (ours)": (lambda h, w, y: chunked_causal_lm_loss(h, w, y, chunk_size=CHUNK_SIZE, fused=True), 3),
        "full logits F.cross_entropy": (full_logits_loss, 3),
    }
    for rows in FUSED_ROWS:
        out[f"fused T={rows}"] = (fused_rows_loss(rows), 3)
    return out


def fwd_bwd(fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = fn(hidden, weight, labels)
    loss.backward()
    return loss


def fwd_only(fn, hidden, weight, labels):
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        return fn(hidden, weight, labels)


def validate(names_fns, hidden, weight, labels) -> dict:
    """name -> scaled errors vs the torch path (+ 'error' when over tolerance or raised)."""
    ref_name = "torch chunked (current)"
    loss = fwd_bwd(names_fns[ref_name][0], hidden, weight, labels)
    ref = (loss.detach(), hidden.grad, weight.grad)
    checks = {}
    for name, (fn, _) in names_fns.items():
        if name == ref_name:
            continue
        try:
            loss = fwd_bwd(fn, hidden, weight, labels)
            errs = {k: scaled_error(a, b) for k, a, b in zip(TOL, (loss.detach(), hidden.grad, weight.grad), ref,
                                                             strict=True)}
            no_grad = fwd_only(fn, hidden, weight, labels)
            errs["loss_no_grad"] = scaled_error(no_grad, ref[0])
            bad = {k: v for k, v in errs.items() if not v <= TOL.get(k, TOL["loss"])}
            if bad:
                errs["error"] = f"validation failed: {bad} (tolerances {TOL})"
        except Exception as exc:
            traceback.print_exc()
            errs = {"error": f"validation raised {type(exc).__name__}: {str(exc)[:300]}"}
        print(f"validate {name}: {errs}", flush=True)
        checks[name] = errs
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()
    return checks


def time_variants(names_fns, checks, hidden, weight, labels, flops_per_matmul) -> list[dict]:
    rows = []
    for name, (fn, matmuls) in names_fns.items():
        row = {"variant": name, "matmuls": matmuls, **{f"err_{k}": v for k, v in checks.get(name, {}).items()}}
        if "error" not in checks.get(name, {}):
            try:
                row["fwd_bwd_ms"] = time_ms(lambda fn=fn: fwd_bwd(fn, hidden, weight, labels))
                row["fwd_no_grad_ms"] = time_ms(lambda fn=fn: fwd_only(fn, hidden, weight, labels))
                hidden.grad = weight.grad = None
                row["peak_gib"], row["peak_above_inputs_gib"] = peak_gib(lambda fn=fn: fwd_bwd(fn, hidden, weight,
                                                                                               labels))
                row["matmul_tflops"] = matmuls * flops_per_matmul / (row["fwd_bwd_ms"] / 1e3) / 1e12
                row["matmul_floor_ms"] = matmuls * flops_per_matmul / BF16_MEASURED_FLOPS * 1e3
            except Exception as exc:
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()
        print(row, flush=True)
        rows.append(row)
    return rows


def time_row_kernel(vocab: int, rows: int = 2048) -> list[dict]:
    """The Triton row kernel alone on a (rows, V) bf16 chunk (in place), per (block, num_warps)."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    buf = (2 * torch.randn(rows, vocab, device=DEVICE, generator=g)).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=DEVICE, generator=g)
    out = []
    for block, warps in KERNEL_CONFIGS:
        row = {"block": block, "num_warps": warps, "rows": rows}
        try:
            ref = F.cross_entropy(buf.float(), targets, reduction="none")
            got = triton_ce.cross_entropy_rows_(buf.clone(), targets, -100, False, block, warps)
            row["err_loss"] = scaled_error(got, ref)
            for store_grad, passes in ((True, 3), (False, 1)):
                ms = time_ms(lambda sg=store_grad, b=block, w=warps: triton_ce.cross_entropy_rows_(
                    buf, targets, -100, sg, b, w))
                key = "grad" if store_grad else "loss_only"
                row[f"{key}_ms"] = ms
                row[f"{key}_gb_s"] = passes * 2 * rows * vocab / (ms / 1e3) / 1e9
                row[f"{key}_frac_copy_bw"] = row[f"{key}_gb_s"] * 1e9 / HBM_BYTES_PER_S
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(row, flush=True)
        out.append(row)
    return out


def time_train_step(args) -> list[dict]:
    """ms per training step of the 370m model with the fused loss and with the torch path."""
    from bench_train_gpu import ours_loss, train_step_fn

    from moai_lib.config import get_mamba_config
    from moai_lib.model.mamba import MoaiMambaForCausalLM

    config = get_mamba_config(args.train_preset, kernel_backend="triton")
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = MoaiMambaForCausalLM(config)
    model.train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=DEVICE)
    original = loss_module.use_fused_loss
    paths = (("torch chunked (current)", False), ("fused (ours)", True))
    out = []
    try:
        losses = {}  # both losses on the same weights, before any step changes them
        for name, fused in paths:
            loss_module.use_fused_loss = lambda _f, _d, fused=fused: fused
            with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
                losses[name] = ours_loss(model, ids).item()
        for name, fused in paths:
            loss_module.use_fused_loss = lambda _f, _d, fused=fused: fused
            row = {"variant": name, "preset": args.train_preset, "batch": args.batch, "L": args.seq,
                   "loss": losses[name], "relative_loss_diff": abs(losses[name] - losses[paths[0][0]]) /
                   abs(losses[paths[0][0]])}
            try:
                torch.cuda.reset_peak_memory_stats()
                row["ms_per_step"] = time_ms(train_step_fn(model, ours_loss, ids), warmup=3, repeats=8)
                row["tokens_per_s"] = args.batch * args.seq / (row["ms_per_step"] / 1e3)
                row["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
            except Exception as exc:
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(row, flush=True)
            out.append(row)
    finally:
        loss_module.use_fused_loss = original
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048, help="counted tokens per sequence (inputs are seq+1 long)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=128000)
    p.add_argument("--no-train-step", dest="train_step", action="store_false")
    p.add_argument("--train-preset", default="370m")
    p.add_argument("--out", default=os.path.join(RESULTS, "loss_gpu.json"))
    args = p.parse_args()
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    n_tokens = args.batch * args.seq
    flops_per_matmul = 2 * n_tokens * args.vocab * args.hidden
    print(f"N={n_tokens} d={args.hidden} V={args.vocab}: one LM-head matmul = {flops_per_matmul / 1e12:.2f} TFLOP "
          f"({flops_per_matmul / BF16_MEASURED_FLOPS * 1e3:.2f} ms at 792 TFLOP/s)", flush=True)
    print(f"fp32-output addmm for dW: {triton_ce._addmm_out_dtype_works(torch.device(DEVICE))}", flush=True)

    hidden, weight, labels = make_inputs(args)
    hidden.requires_grad_()
    weight.requires_grad_()
    names_fns = variants()
    checks = validate(names_fns, hidden, weight, labels)
    rows = time_variants(names_fns, checks, hidden, weight, labels, flops_per_matmul)
    del hidden, weight, labels
    torch.cuda.empty_cache()
    kernel_rows = time_row_kernel(args.vocab)
    train_rows = time_train_step(args) if args.train_step else []

    print("\n| variant | fwd+bwd ms | fwd (no_grad) ms | matmul TFLOP/s | peak above inputs GiB | errors vs torch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        errs = r.get("error") or ", ".join(f"{k[4:]} {v:.1e}" for k, v in r.items()
                                           if k.startswith("err_") and isinstance(v, float))
        nan = float("nan")
        print(f"| {r['variant']} | {r.get('fwd_bwd_ms', nan):.2f} | {r.get('fwd_no_grad_ms', nan):.2f}"
              f" | {r.get('matmul_tflops', nan):.0f} | {r.get('peak_above_inputs_gib', nan):.2f} | {errs} |")
    print("\n| row kernel (block, warps) | grad ms | GB/s | of copy BW | loss-only ms |")
    print("|---|---|---|---|---|")
    for r in kernel_rows:
        print(f"| {r['block']}, {r['num_warps']} | {r.get('grad_ms', float('nan')):.3f} | "
              f"{r.get('grad_gb_s', float('nan')):.0f} | {r.get('grad_frac_copy_bw', float('nan')):.2f} | "
              f"{r.get('loss_only_ms', float('nan')):.3f} |")
    for r in train_rows:
        print(f"train step {r['preset']}, {r['variant']}: {r.get('ms_per_step', r.get('error'))} ms, "
              f"{r.get('tokens_per_s', 0):.0f} tok/s, peak {r.get('peak_gib', 0):.1f} GiB")
    write_json(args.out, {
        "shape": {"tokens": n_tokens, "hidden": args.hidden, "vocab": args.vocab, "chunk_size": CHUNK_SIZE},
        "addmm_fp32_out": triton_ce._addmm_out_dtype_works(torch.device(DEVICE)),
        "loss_rows": rows, "row_kernel": kernel_rows, "train_step": train_rows,
    })


if __name__ == "__main__":
    main()
