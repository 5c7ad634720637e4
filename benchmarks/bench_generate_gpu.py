"""Decoding speed on the GPU: our model with CUDA graphs around the step vs mamba-ssm's `generate(cg=True)`.

Questions: (1) decode tokens/s at batch 1 and 64; (2) time to first token (the prefill of a 2K prompt, batch 1);
(3) per-token latency after a 1K vs a 32K context (a recurrent model should be flat): the same slope, over 16..80
new tokens, and for ours also the replayed step alone; (4) GPU kernels per token of our step (torch.profiler
over a few graph-less `decode_logits` calls: what one graph replay launches). mamba-ssm rows are skipped when
its CUDA kernels do not import.

Model: the `--preset` (370m) in bf16 with random weights; mamba-ssm's `MambaLMHeadModel` of the same shape gets
the same weights. First it validates: our CUDA-graph decoding gives exactly the tokens of our eager decoding;
our prefill logits match mamba-ssm's (scaled error), and the share of greedy tokens that agree with its
`generate` is recorded (random weights give nearly flat logits, so bf16 rounding can flip a near-tie).

Per-token decode time, for both, is the slope of the whole greedy loop's time over the number of new tokens:
(T(n2) − T(n1)) / (n2 − n1), so the prefill cancels; it includes sampling (argmax) and the Python loop, as a user
sees it. Both capture their CUDA graph once and reuse it in every timed run (ours: one `CudaGraphDecoder` passed
to `greedy_decode`; mamba-ssm's `generate(cg=True)` keeps its graph across calls): a capture per run, whose time
varies, does not cancel in the slope (the fifth session's runs gave ours a slope below its own replayed step).
tokens/s = batch / per-token time. Ours eager (no graph) is timed at batch 1 for the graph's gain. TTFT = the
prefill forward + argmax of the first token, median of 5; ours also as a replayed `CudaGraphPrefill` captured once
for the prompt's length (the capture time is reported; validated against the eager prefill first: in the graph
the scan splits the 2K prompt into segments, so the logits agree up to fp32 summation order).

    python benchmarks/bench_generate_gpu.py [--preset 370m] [--out results/generate_gpu.json]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from gpu_common import RESULTS, copy_weights, mamba_ssm_lm, mamba_ssm_or_reason, scaled_error, write_json

from moai_lib.config import get_mamba_config
from moai_lib.model.generate import CudaGraphDecoder, CudaGraphPrefill, decode_logits, greedy_decode
from moai_lib.model.mamba import MoaiMambaForCausalLM


def wall_ms(fn, repeats: int = 3) -> float:
    """Median wall time of fn() in ms, the GPU drained before and after."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def per_token_ms(run, n1: int, n2: int) -> float:
    """Slope of run(n)'s time over n (the new tokens)."""
    run(n2)  # warm-up (compiles, captures, allocates for the longest)
    return (wall_ms(lambda: run(n2)) - wall_ms(lambda: run(n1))) / (n2 - n1)


def theirs_generate(theirs, prompt, n):
    return theirs.generate(prompt, max_length=prompt.shape[1] + n, cg=True, top_k=1)


def captured_decoder(model, prompt) -> CudaGraphDecoder:
    """A `CudaGraphDecoder` for prompt's batch size, captured once; `greedy_decode(..., cuda_graph=decoder)`
    reuses it for every run."""
    return CudaGraphDecoder(model, model(input_ids=prompt, use_cache=True, logits_to_keep=1).cache)


def graph_step_ms(model, prompt, steps: int = 64) -> float:
    """Per-token time of the replayed graph alone after prefilling `prompt` (the context-length question)."""
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    decoder = CudaGraphDecoder(model, out.cache)
    token = out.logits[:, -1].argmax(-1, keepdim=True)

    def run():
        nonlocal token
        for _ in range(steps):
            token = decoder(token).argmax(-1, keepdim=True)
    run()
    return wall_ms(run) / steps


def step_kernels(model, prompt, steps: int = 4) -> dict:
    """GPU kernels launched per token by the graph-less step (`decode_logits`), from torch.profiler: what one
    replay of the captured graph runs. Returns the count and the ten most frequent kernel names."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    decode_logits(model, token, out.cache)  # warm-up: Triton compiles, the session's A is computed
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decode_logits(model, token, out.cache)
        torch.cuda.synchronize()
    names = Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    if not names:  # older kineto builds attach kernels to their launching CPU op only
        names = Counter(k.name for e in prof.events() for k in getattr(e, "kernels", []))
    return {"kernels_per_token": sum(names.values()) / steps,
            "top": {k: v / steps for k, v in names.most_common(10)}}


def theirs_step_ms(theirs, prompt, n1=16, n2=80) -> float:
    return per_token_ms(lambda n: theirs_generate(theirs, prompt, n), n1, n2)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="370m")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--prompt", type=int, default=16, help="prompt length for the decode-speed rows")
    p.add_argument("--n1", type=int, default=32)
    p.add_argument("--n2", type=int, default=160)
    p.add_argument("--ttft-prompt", type=int, default=2048)
    p.add_argument("--contexts", default="1024,32768")
    p.add_argument("--out", default=os.path.join(RESULTS, "generate_gpu.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    config = get_mamba_config(args.preset, kernel_backend="triton")
    torch.manual_seed(0)
    with torch.device(device):
        model = MoaiMambaForCausalLM(config).to(torch.bfloat16).eval()
    ms = mamba_ssm_or_reason()
    theirs = None
    if not isinstance(ms, str):
        theirs = mamba_ssm_lm(config, ms, device, dtype=torch.bfloat16).eval()
        copy_weights(model, theirs)
    vocab = config.vocab_size

    # Validation.
    g = torch.Generator(device=device).manual_seed(1)
    prompt = torch.randint(0, vocab, (4, 64), device=device, generator=g)
    eager = greedy_decode(model, prompt, 48)
    graph = greedy_decode(model, prompt, 48, cuda_graph=True)
    check = {"graph_equals_eager": bool(torch.equal(eager, graph))}
    if theirs is not None:
        ours_logits = model(input_ids=prompt, use_cache=False).logits[..., :vocab]
        their_logits = theirs(prompt).logits[..., :vocab].float()
        check["prefill_logits_scaled_error"] = scaled_error(ours_logits, their_logits)
        seq = theirs_generate(theirs, prompt, 48)[:, prompt.shape[1]:]
        check["token_agreement_with_mamba_ssm"] = (seq == graph).float().mean().item()
    print("validation:", check, flush=True)
    if not check["graph_equals_eager"]:
        raise SystemExit("CUDA-graph decoding does not reproduce eager decoding: not timing it")

    rows = []
    for batch in (1, 64):
        row = {"question": "kernels", "model": "ours (graph-less step)", "batch": batch,
               **step_kernels(model, prompt[:1].expand(batch, -1).contiguous())}
        print(row, flush=True)
        rows.append(row)
    for batch in [int(b) for b in args.batches.split(",")]:
        prompt = torch.randint(0, vocab, (batch, args.prompt), device=device, generator=g)
        decoder = captured_decoder(model, prompt)
        runs = {"ours (CUDA graph)": lambda n, pr=prompt, dec=decoder: greedy_decode(model, pr, n, cuda_graph=dec)}
        if batch == 1:
            runs["ours (eager)"] = lambda n, pr=prompt: greedy_decode(model, pr, n)
        if theirs is not None:
            runs["mamba-ssm generate(cg=True)"] = lambda n, pr=prompt: theirs_generate(theirs, pr, n)
        for name, run in runs.items():
            t = per_token_ms(run, args.n1, args.n2)
            row = {"question": "decode", "model": name, "batch": batch, "ms_per_token": t,
                   "tokens_per_s": batch / (t / 1e3)}
            print(row, flush=True)
            rows.append(row)

    prompt = torch.randint(0, vocab, (1, args.ttft_prompt), device=device, generator=g)
    eager_logits = model(input_ids=prompt, use_cache=True, logits_to_keep=1).logits
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prefill = CudaGraphPrefill(model, 1, args.ttft_prompt)  # captured once, as a server keeps one per length
    torch.cuda.synchronize()
    capture_ms = (time.perf_counter() - t0) * 1e3
    graph_logits, _ = prefill(prompt)
    row = {"question": "ttft_validation", "prompt": args.ttft_prompt, "capture_ms": capture_ms,
           "graph_vs_eager_scaled_error": scaled_error(graph_logits, eager_logits),  # the split scan: fp32 order
           "same_first_token": bool(torch.equal(graph_logits[:, -1].argmax(-1), eager_logits[:, -1].argmax(-1)))}
    print(row, flush=True)
    rows.append(row)
    if row["graph_vs_eager_scaled_error"] > 2e-2:
        raise RuntimeError(f"the captured prefill's logits differ from the eager prefill's: {row}")
    ttft = {"ours": lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1),
            "ours (CUDA-graph prefill)": lambda: prefill(prompt)[0][:, -1].argmax(-1)}
    if theirs is not None:
        from mamba_ssm.utils.generation import InferenceParams

        def their_prefill():
            params = InferenceParams(max_seqlen=args.ttft_prompt + 1, max_batch_size=1)
            return theirs(prompt, inference_params=params, num_last_tokens=1).logits[:, -1].argmax(-1)
        ttft["mamba-ssm"] = their_prefill
    for name, fn in ttft.items():
        fn()
        row = {"question": "ttft", "model": name, "prompt": args.ttft_prompt, "ms": wall_ms(fn, 5)}
        print(row, flush=True)
        rows.append(row)

    for context in [int(c) for c in args.contexts.split(",")]:
        prompt = torch.randint(0, vocab, (1, context), device=device, generator=g)
        row = {"question": "context", "model": "ours (CUDA graph), replay only", "context": context,
               "ms_per_token": graph_step_ms(model, prompt)}
        print(row, flush=True)
        rows.append(row)
        decoder = captured_decoder(model, prompt)
        row = {"question": "context", "model": "ours (CUDA graph)", "context": context,
               "ms_per_token": per_token_ms(lambda n, pr=prompt, dec=decoder: greedy_decode(model, pr, n,
                                                                                           cuda_graph=dec), 16, 80)}
        print(row, flush=True)
        rows.append(row)
        if theirs is not None:
            row = {"question": "context", "model": "mamba-ssm generate(cg=True)", "context": context,
                   "ms_per_token": theirs_step_ms(theirs, prompt)}
            print(row, flush=True)
            rows.append(row)
        torch.cuda.empty_cache()

    print(f"\n{args.preset} bf16, greedy; decode rows: prompt {args.prompt}, "
          f"slope over {args.n1}..{args.n2} new tokens\n")
    print("| question | model | batch / context | ms per token (or TTFT ms) | tokens/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["question"] == "kernels":
            print(f"| kernels per token | {r['model']} | B={r['batch']} | {r['kernels_per_token']:.0f} kernels | |")
        elif r["question"] == "decode":
            print(f"| decode | {r['model']} | B={r['batch']} | {r['ms_per_token']:.3f} | {r['tokens_per_s']:.0f} |")
        elif r["question"] == "ttft":
            print(f"| TTFT | {r['model']} | prompt {r['prompt']} | {r['ms']:.2f} | |")
        elif r["question"] == "ttft_validation":
            print(f"| TTFT prefill graph: capture {r['capture_ms']:.0f} ms, logits vs eager "
                  f"{r['graph_vs_eager_scaled_error']:.1e}, same first token {r['same_first_token']} | | | | |")
        else:
            print(f"| latency | {r['model']} | context {r['context']} | {r['ms_per_token']:.3f} | |")
    write_json(args.out, {"preset": args.preset, "dtype": "bfloat16", "validation": check,
                          "mamba_ssm": ms if isinstance(ms, str) else "available", "rows": rows})


if __name__ == "__main__":
    main()
