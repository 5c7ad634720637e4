"""Every quantization method on one model: held-out perplexity vs the float model, storage, decode speed.

    python benchmarks/bench_quant_methods.py                       # smoke run: tiny model on a Markov chain
    python benchmarks/bench_quant_methods.py --model DIR --data ids.pt --group-size 128 [--json out.json]

--model: a float MoaiMamba checkpoint (save_pretrained). --data: a torch file holding token ids (N, L); the
first quarter of the rows calibrates GPTQ/AWQ, the rest is held out. Without them, the `tiny` preset (vocab 64)
is trained for 200 steps on a fixed sparse Markov chain (the same construction as tests/quant/conftest.py), so
the table is only a smoke test of the machinery, not a quality claim.

Columns: ppl and its change vs the float model on the held-out rows; bits/weight and MB of the quantized
layers (`storage_summary`: packed weights + scales + zero points); decode tokens/s (batch 1, greedy, with the
recurrent cache, on the model's device). Validate first: every method's loss must be finite.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from moai_lib import MoaiMambaForCausalLM, get_mamba_config
from moai_lib.quant import (
    AWQConfig,
    BnbConfig,
    Float8Config,
    FP4Config,
    GPTQConfig,
    IntWeightOnlyConfig,
    quantize_,
    storage_summary,
)
from moai_lib.quant.calibration import calibrate


def methods(group_size: int) -> dict:
    """name → function(model, calib) quantizing in place."""
    g = group_size
    return {
        "rtn-int8": lambda m, c: quantize_(m, IntWeightOnlyConfig(bits=8, group_size=g)),
        "rtn-int4": lambda m, c: quantize_(m, IntWeightOnlyConfig(bits=4, group_size=g)),
        "gptq-int4": lambda m, c: calibrate(m, GPTQConfig(bits=4, group_size=g), c),
        "gptq-int4-actorder": lambda m, c: calibrate(
            m, GPTQConfig(bits=4, group_size=g, act_order=True, static_groups=True), c),
        "awq-int4": lambda m, c: calibrate(m, AWQConfig(bits=4, group_size=g), c),
        "fp8-e4m3": lambda m, c: quantize_(m, Float8Config()),
        "nvfp4": lambda m, c: quantize_(m, FP4Config("nvfp4")),
        "mxfp4": lambda m, c: quantize_(m, FP4Config("mxfp4")),
        "bnb-nf4": lambda m, c: quantize_(m, BnbConfig(quant_type="nf4")),
        "bnb-int8": lambda m, c: quantize_(m, BnbConfig(quant_type="int8")),
    }


def markov_setup(steps: int = 200) -> tuple[MoaiMambaForCausalLM, torch.Tensor]:
    vocab = 64
    successors = torch.randint(0, vocab, (vocab, 3), generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(0)
    n, length = steps * 16 + 64, 64
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    choice = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), n * length, replacement=True, generator=gen)
    choice = choice.reshape(n, length)
    for t in range(1, length):
        ids[:, t] = successors[ids[:, t - 1], choice[:, t]]
    torch.manual_seed(0)
    model = MoaiMambaForCausalLM(get_mamba_config("tiny", vocab_size=vocab, dt_rank=8, kernel_backend="torch"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = ids[step * 16:(step + 1) * 16, :32]
        loss = model(batch, labels=batch, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), ids[steps * 16:]


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor, batch_size: int = 8) -> float:
    total = count = 0.0
    for batch in ids.split(batch_size):
        n = batch.numel() - batch.shape[0]
        total += model(batch, labels=batch, use_cache=False).loss.item() * n
        count += n
    return total / count


@torch.no_grad()
def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int = 32) -> float:
    model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return new_tokens / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="float MoaiMamba checkpoint directory")
    parser.add_argument("--data", help="torch file with token ids (N, L)")
    parser.add_argument("--group-size", type=int, default=None, help="default: 128, or 32 for the smoke run")
    parser.add_argument("--only", nargs="*", help="method names to run (default: all)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    if args.model:
        model = MoaiMambaForCausalLM.from_pretrained(args.model).eval()
        ids = torch.load(args.data)
        group_size = args.group_size or 128
    else:
        model, ids = markov_setup()
        group_size = args.group_size or 32
    device = next(model.parameters()).device
    ids = ids.to(device)
    calib, heldout = ids[: len(ids) // 4], ids[len(ids) // 4:]
    prompt = heldout[:1, :8]
    base = eval_loss(model, heldout)
    rows = [{"method": "float", "loss": round(base, 4), "ppl": round(math.exp(base), 4), "ppl_delta_pct": 0.0,
             "tokens_per_s": round(decode_tokens_per_s(model, prompt), 1)}]
    print(json.dumps(rows[0]))
    for name, apply in methods(group_size).items():
        if args.only and name not in args.only:
            continue
        quantized = copy.deepcopy(model)
        t0 = time.perf_counter()
        apply(quantized, calib)
        seconds = time.perf_counter() - t0
        loss = eval_loss(quantized, heldout)
        if not math.isfinite(loss):
            raise RuntimeError(f"{name}: held-out loss is {loss}")
        size = storage_summary(quantized)
        row = {"method": name, "loss": round(loss, 4), "ppl": round(math.exp(loss), 4),
               "ppl_delta_pct": round(100 * (math.exp(loss - base) - 1), 3),
               "bits_per_weight": round(size["bits_per_weight"], 3),
               "quantized_MB": round(size["quantized_bytes"] / 1e6, 3),
               "model_MB": round(size["model_bytes"] / 1e6, 3),
               "quantize_s": round(seconds, 2),
               "tokens_per_s": round(decode_tokens_per_s(quantized, prompt), 1)}
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"group_size": group_size, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
