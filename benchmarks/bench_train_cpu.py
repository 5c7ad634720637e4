"""Training throughput of `moai_lib.train.pretrain` on small configs, validated first, with napkin math.

Question: how many tokens/s does the training loop reach on this machine, what fraction of the machine's
dense-matmul throughput is that, and what do checkpoints cost?

1. data: the sample corpus tokenized with a 512-token BPE and packed (or --data_dir).
2. validate: each config's run must stay finite and its validation perplexity must end below the unigram one.
3. time: tokens/s over the optimizer steps only (pretrain's own figure), and the time of one checkpoint.
4. napkin math: a training step costs ≈ 6 FLOPs per matmul weight per token (forward 2, backward 4), LM head
   included; the selective scan and the conv are elementwise and left out, so the fraction is a lower bound
   of how busy the machine is. It is compared with a measured fp32 GEMM (n=1024) at the same thread count.

    python benchmarks/bench_train_cpu.py [--threads 1] [--steps 20] [--data_dir D] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from moai_lib import get_mamba_config  # noqa: E402
from moai_lib.data import TokenizeParams, prepare_data  # noqa: E402
from moai_lib.train import TrainParams, build_model, pretrain  # noqa: E402
from moai_lib.train.checkpoint import save_checkpoint  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
CONFIGS = {  # name → (config overrides, batch size, sequence length, learning rate)
    "tiny d64 L2": (dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128), 16, 128, 1e-2),
    "small d256 L4": (dict(hidden_size=256, num_hidden_layers=4, intermediate_size=512), 8, 128, 3e-3),
}


def gemm_gflops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def matmul_weights(model: nn.Module) -> int:
    """Weights that take part in a matmul per token (every nn.Linear, the LM head included even when tied)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data_dir", help="packed shards (default: tokenize data/sample into a temp dir)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = os.path.join(tmp, "data")
            prepare_data(TokenizeParams(corpus=[str(SAMPLE / "train.jsonl")],
                                        valid_corpus=[str(SAMPLE / "valid.jsonl")], vocab_size=512, block_size=128,
                                        cache_dir=os.path.join(tmp, "cache")), data_dir)
        peak = gemm_gflops()
        rows = []
        for name, (overrides, batch, seq, lr) in CONFIGS.items():
            config = get_mamba_config("tiny", vocab_size=512, **overrides)
            params = TrainParams(batch_size=batch, max_length=seq, max_steps=args.steps, learning_rate=lr,
                                 warmup_steps=2, eval_batches=4, eval_batch_size=32, progress=False)
            metrics = pretrain(params, config, data_dir, os.path.join(tmp, name.replace(" ", "_")))
            # validate before reporting a speed
            ok = metrics["completed"] and metrics["val_ppl"] < metrics["valid_unigram_ppl"]
            if not ok:
                raise SystemExit(f"{name}: the run did not learn (ppl {metrics['val_ppl']:.1f}, unigram "
                                 f"{metrics['valid_unigram_ppl']:.1f}); not timing a broken loop")
            model = build_model(config, seed=0)
            optimizer = torch.optim.AdamW(model.parameters())
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            t0 = time.perf_counter()
            save_checkpoint(os.path.join(tmp, "ckpt"), 1, model, optimizer, scheduler, {})
            ckpt_s = time.perf_counter() - t0
            flops_per_token = 6 * matmul_weights(model)
            achieved = metrics["tokens_per_second"] * flops_per_token / 1e9
            rows.append({"config": name, "params": metrics["num_parameters"], "batch": batch, "seq": seq,
                         "tokens_per_second": round(metrics["tokens_per_second"]),
                         "matmul_gflops": round(achieved, 2), "fraction_of_gemm_peak": round(achieved / peak, 4),
                         "val_ppl": round(metrics["val_ppl"], 2), "unigram_ppl": round(metrics["valid_unigram_ppl"], 2),
                         "checkpoint_s": round(ckpt_s, 4)})
    cpu = platform.processor() or platform.machine()
    print(f"fp32 GEMM n=1024 with {args.threads} thread(s): {peak:.1f} GFLOP/s ({cpu})")
    print(f"{'config':<16}{'params':>10}{'B×L':>9}{'tok/s':>9}{'GFLOP/s':>9}{'of GEMM':>9}{'ppl':>8}{'unigram':>9}"
          f"{'ckpt s':>8}")
    for r in rows:
        print(f"{r['config']:<16}{r['params']:>10,}{r['batch']:>4}×{r['seq']:<4}{r['tokens_per_second']:>9,}"
              f"{r['matmul_gflops']:>9.2f}{r['fraction_of_gemm_peak']:>9.1%}{r['val_ppl']:>8.1f}{r['unigram_ppl']:>9.1f}"
              f"{r['checkpoint_s']:>8.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": args.threads, "steps": args.steps, "gemm_gflops": peak,
                                              "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
