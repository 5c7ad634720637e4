"""Quantized decoding on the GPU: tokens/s and memory at batch 1 for the `2b` preset in bf16, INT4, FP8 and NF4.

Question: how much faster than bf16 does a batch-1 decode step run once the weights are 4 or 8 bits, and how
much memory does each variant hold? (Issue target: INT4 ≥ 2× bf16.)

Model: the `2b` preset (d=2048, 24 layers, MLP 6144, untied 128K vocabulary; 2.07B parameters) with random
weights, bf16. Variants, each quantizing the default layers (in_proj, x_proj, out_proj, fc1, fc2; the LM head,
embedding, conv, dt_proj and the SSM parameters stay bf16/fp32) with `moai_lib.quant.quantize_`:
- bf16 (the anchor);
- INT4 g128 RTN, `QuantizedLinear` backend "int4mm" = torch's tinygemm kernel (`aten._weight_int4pack_mm`,
  the kernel behind torchao's `tile_packed_to_4d` int4 format); also with the LM head quantized;
- the same with backend "triton" (our weight-streaming GEMV, `moai_lib/kernels/triton_gemv.py`, for ≤ 16 rows;
  the 32-token prefill dequantizes + dense matmul), with and without the LM head;
- FP8 E4M3 per-row weights + dynamic per-token activations, `torch._scaled_mm` (`Float8Config`); and FP8
  backend "triton": weight-only E4M3 GEMV for the decode step (bf16 activations, no per-token quantization);
- NF4 (bitsandbytes `Linear4bit`, blocksize 64, bf16 compute), when bitsandbytes imports.
Every variant decodes with the step captured as a CUDA graph (`CudaGraphDecoder`): at batch 1 launch overhead
would otherwise hide the weight-read time that quantization shrinks.

Validation before timing: the SQNR of each variant's prefill logits against bf16's, CUDA-graph decoding =
eager decoding (8 tokens), and for the Triton variants the SQNR of a 1-token forward (every linear then runs
the GEMV) against the same weights through a bf16 matmul with the dequantized weight (INT4 backend "dequant";
for FP8 `Float8Linear.weight`, not the activation-quantized "emulated" backend).

Timing: prefill a 32-token prompt, then `--steps` replayed steps (argmax included), median of 3. Memory: bytes
allocated by the model (weights, plus the kernel layouts the int4 kernel builds: on CUDA the uint8 copy is released
once tinygemm's layout exists, so INT4 holds each weight once) and the peak during decoding. Kernels per token:
torch.profiler over graph-less steps. Floor: the bytes a step must read (every weight once) / 4 TB/s.

    python benchmarks/bench_quant_inference.py [--preset 2b] [--out results/quant_inference.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from bench_generate_gpu import step_kernels
from gpu_common import HBM_BYTES_PER_S, RESULTS, GiB, write_json

from moai_lib.config import get_mamba_config
from moai_lib.model.generate import CudaGraphDecoder, greedy_decode
from moai_lib.model.mamba import MoaiMambaForCausalLM
from moai_lib.quant import (
    DEFAULT_QUANTIZED_LAYERS,
    BnbConfig,
    Float8Config,
    Float8Linear,
    IntWeightOnlyConfig,
    QuantizedLinear,
    layer_filter,
    quantize_,
)
from moai_lib.quant import primitives as P

WITH_HEAD = layer_filter(*DEFAULT_QUANTIZED_LAYERS, "lm_head")
# name: (config, filter_fn, backend set on every QuantizedLinear afterwards or None)
VARIANTS = {
    "bf16": None,
    "int4 g128 (tinygemm)": (IntWeightOnlyConfig(bits=4, group_size=128), None, "int4mm"),
    "int4 g128 (triton gemv)": (IntWeightOnlyConfig(bits=4, group_size=128), None, "triton"),
    "int4 g128 + lm_head": (IntWeightOnlyConfig(bits=4, group_size=128), WITH_HEAD, "int4mm"),
    "int4 g128 + lm_head (triton gemv)": (IntWeightOnlyConfig(bits=4, group_size=128), WITH_HEAD, "triton"),
    "fp8 e4m3 (scaled_mm)": (Float8Config(backend="scaled_mm"), None, None),
    "fp8 e4m3 (triton gemv)": (Float8Config(backend="triton"), None, None),
    "nf4 (bitsandbytes)": (BnbConfig(quant_type="nf4", compute_dtype=torch.bfloat16), None, None),
}


def gemv_vs_reference_sqnr(model, prompt) -> float:
    """SQNR of a 1-token forward (one row: every Triton layer runs the GEMV, as in a decode step) against the same
    weights through the reference matmul: INT4 layers on backend "dequant" (exact Ŵ, bf16 matmul), FP8 layers
    replaced by their `Float8Linear.weight` in bf16 (the GEMV is weight-only, unlike the "emulated" backend).
    (Until the sixth session an 8-token forward: INT4 "triton" now runs 2+ rows as dequantize + matmul.)"""
    ids = prompt[:, :1]
    fast = model(input_ids=ids, use_cache=False).logits.float()
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear | Float8Linear)]
    saved = [(m, m.backend) for m in layers]
    for m in layers:
        if isinstance(m, QuantizedLinear):
            m.backend = "dequant"
        else:
            m.forward = lambda x, m=m: torch.nn.functional.linear(
                x, m.weight.to(x.dtype), m.bias.to(x.dtype) if m.bias is not None else None)
    try:
        ref = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        for m, backend in saved:
            m.backend = backend
            if isinstance(m, Float8Linear):
                del m.forward  # back to the class method
    return P.sqnr(ref, fast)


def contiguous_inputs(model) -> None:
    """Make every quantized layer's input contiguous. torch's int4 kernels reject strided inputs, and the mixer
    feeds x_proj and out_proj transposed views in the full-sequence (prefill) path; decode inputs are already
    contiguous, so this costs nothing per token. (A fix belongs in `QuantizedLinear.forward`.)"""
    for module in model.modules():
        if isinstance(module, QuantizedLinear | Float8Linear):
            module.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))


def step_read_bytes(model) -> int:
    """Bytes one decode step reads: every parameter and buffer except the embedding (one row is read); for INT4
    layers whose uint8 copy was released (CUDA), the layout that replaced it (`QuantizedLinear.read_tensors`)."""
    emb = model.backbone.embedding.weight
    seen, total = {emb.data_ptr()}, 0
    tensors = [*model.parameters()]
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            tensors += module.read_tensors()
        else:
            tensors += list(module.buffers(recurse=False))
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def decode_ms(model, prompt, steps: int) -> tuple[float, float]:
    """(ms per replayed step incl. argmax, peak GiB during the decoding)."""
    torch.cuda.reset_peak_memory_stats()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    decoder = CudaGraphDecoder(model, out.cache)
    token = out.logits[:, -1].argmax(-1, keepdim=True)

    def run():
        nonlocal token
        for _ in range(steps):
            token = decoder(token).argmax(-1, keepdim=True)
    run()
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3 / steps)
    return sorted(times)[1], torch.cuda.max_memory_allocated() / GiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="2b")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=os.path.join(RESULTS, "quant_inference.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    config = get_mamba_config(args.preset, kernel_backend="triton")
    torch.manual_seed(0)
    # Quantization runs under no_grad, not inference_mode: the int4 layers key their kernel-layout cache on the
    # buffers' version counters, which inference tensors lack.
    torch.set_grad_enabled(False)
    with torch.device(device):
        base = MoaiMambaForCausalLM(config).to(torch.bfloat16).eval()
    g = torch.Generator(device=device).manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (1, 32), device=device, generator=g)
    ref_logits = base(input_ids=prompt, use_cache=False).logits[..., :config.vocab_size]
    rows = []
    for name in args.variants.split(","):
        row = {"variant": name}
        try:
            if VARIANTS[name] is None:
                model = base
                torch.cuda.synchronize()
                row["model_gib"] = torch.cuda.memory_allocated() / GiB
            else:
                quant_config, filter_fn, backend = VARIANTS[name]
                before = torch.cuda.memory_allocated()
                model = quantize_(copy.deepcopy(base), quant_config, filter_fn=filter_fn)
                if backend is not None:
                    for module in model.modules():
                        if isinstance(module, QuantizedLinear):
                            module.backend = backend
                contiguous_inputs(model)
                logits = model(input_ids=prompt, use_cache=False).logits[..., :config.vocab_size]
                torch.cuda.synchronize()
                # The copy's bytes (incl. the int4 kernel layout built by that first call), + bf16's for the
                # shared baseline: what a process holding only this model would hold.
                row["model_gib"] = (torch.cuda.memory_allocated() - before) / GiB
                row["logits_sqnr_db"] = P.sqnr(ref_logits, logits)
                if "triton" in name:
                    row["gemv_vs_reference_sqnr_db"] = gemv_vs_reference_sqnr(model, prompt)
            eager = greedy_decode(model, prompt, 8)
            graph = greedy_decode(model, prompt, 8, cuda_graph=True)
            row["graph_equals_eager"] = bool(torch.equal(eager, graph))
            if not row["graph_equals_eager"]:
                raise RuntimeError("CUDA-graph decoding differs from eager decoding")
            row["read_gib_per_step"] = step_read_bytes(model) / GiB
            row["ms_per_token"], row["peak_gib"] = decode_ms(model, prompt, args.steps)
            row.update(step_kernels(model, prompt))
            row["tokens_per_s"] = 1e3 / row["ms_per_token"]
            row["floor_ms"] = step_read_bytes(model) / HBM_BYTES_PER_S * 1e3
            row["of_copy_bw"] = row["floor_ms"] / row["ms_per_token"]
        except Exception as exc:  # a missing package (bitsandbytes), an unsupported kernel
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(row, flush=True)
        rows.append(row)
        if VARIANTS[name] is not None:
            model = None
            torch.cuda.empty_cache()
    print(f"\n{args.preset} ({sum(p.numel() for p in base.parameters()) / 1e9:.2f}B params), batch 1, CUDA graph\n")
    print("| variant | logits SQNR dB | GEMV vs ref SQNR dB | model GiB | read/step GiB | ms/token | tokens/s "
          "| vs bf16 | of copy BW | kernels/token |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    bf16 = next((r for r in rows if r["variant"] == "bf16" and "tokens_per_s" in r), None)
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"| {r['variant']} | error: {r.get('error', '')[:80]} | | | | | | | | |")
            continue
        vs = f"{r['tokens_per_s'] / bf16['tokens_per_s']:.2f}x" if bf16 else "-"
        gemv = f"{r['gemv_vs_reference_sqnr_db']:.1f}" if "gemv_vs_reference_sqnr_db" in r else "-"
        print(f"| {r['variant']} | {r.get('logits_sqnr_db', float('inf')):.1f} | {gemv} | {r['model_gib']:.2f} | "
              f"{r['read_gib_per_step']:.2f} | {r['ms_per_token']:.3f} | {r['tokens_per_s']:.0f} | {vs} | "
              f"{r['of_copy_bw']:.0%} | {r.get('kernels_per_token', float('nan')):.0f} |")
    write_json(args.out, {"preset": args.preset, "batch": 1, "prompt": 32, "rows": rows})


if __name__ == "__main__":
    main()
