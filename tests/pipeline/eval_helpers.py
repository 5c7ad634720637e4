"""Helpers of the evaluation/report/export tests (imported by name: conftest modules are not importable).

Everything is real and tiny: token shards written by `moai_lib.data.write_shards` from the first documents of
each language in data/sample (tokenized with the session's sample tokenizer, packed per language into blocks of
64), a `tiny` MoaiMamba widened to d=128 (so group size 128 divides every quantized layer: in_proj/fc1 take 128
inputs, x_proj/out_proj 256, fc2 256), and quantized variants made with `moai_lib.quant`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from moai_lib import MoaiMambaForCausalLM, get_mamba_config

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"
BLOCK = 64
DOCS_PER_LANG = {"train": 1, "valid": 1}
CHARS_PER_DOC = 600


def write_data_dir(tokenizer_dir: Path, out: Path) -> Path:
    """Train/valid shards with languages (en, ja, ko, zh) and the tokenizer, as `moai tokenize` writes them."""
    from transformers import AutoTokenizer

    from moai_lib.data import write_shards

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    splits = {}
    for split, n_docs in DOCS_PER_LANG.items():
        docs: dict[str, list[str]] = {}
        with open(SAMPLE_DIR / f"{split}.jsonl", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                bucket = docs.setdefault(record["lang"], [])
                if len(bucket) < n_docs:
                    bucket.append(record["text"][:CHARS_PER_DOC])
        blocks = []
        for lang in sorted(docs):
            ids = [t for text in docs[lang] for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
            n = len(ids) // BLOCK
            blocks.append((lang, np.asarray(ids[:n * BLOCK], dtype=np.uint32).reshape(n, BLOCK)))
        splits[split] = blocks
    write_shards(out, splits, BLOCK, tokenizer=tokenizer)
    return out


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> MoaiMambaForCausalLM:
    torch.manual_seed(seed)
    config = get_mamba_config("tiny", hidden_size=128, intermediate_size=256, vocab_size=vocab_size,
                              kernel_backend="torch", eos_token_id=0, pad_token_id=1, **overrides)
    return MoaiMambaForCausalLM(config).eval()


def calibration(data_dir: Path, n: int = 8) -> torch.Tensor:
    from moai_lib.data import PackedDataset

    train = PackedDataset(data_dir, "train")
    return train.batch(np.linspace(0, len(train) - 1, n).round().astype(int))


def quantized(model: MoaiMambaForCausalLM, method: str, calib: torch.Tensor) -> MoaiMambaForCausalLM:
    """A copy of `model` quantized with one of: rtn4 (INT4 g128), rtn8 (INT8 g128), qat (INT4 g128, prepared,
    one training step, converted), gptq, awq (INT4 g128, calibrated on `calib`), fp8."""
    import copy

    from moai_lib.quant import AWQConfig, Float8Config, GPTQConfig, IntWeightOnlyConfig, QATConfig, quantize_

    m = copy.deepcopy(model)
    if method in ("rtn4", "rtn8"):
        return quantize_(m, IntWeightOnlyConfig(bits=int(method[-1]), group_size=128))
    if method == "fp8":
        return quantize_(m, Float8Config())
    if method == "qat":
        config = QATConfig(bits=4, group_size=128)
        quantize_(m, config)
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m(calib, labels=calib, use_cache=False).loss.backward()
        opt.step()
        m.eval()
        return quantize_(m, dataclasses.replace(config, step="convert"))
    config = {"gptq": GPTQConfig(bits=4, group_size=128),
              "awq": AWQConfig(bits=4, group_size=128, n_grid=5, max_tokens=256)}[method]
    quantize_(m, config)
    with torch.no_grad():
        m(calib, use_cache=False)
    return quantize_(m, dataclasses.replace(config, step="convert"))


def save_variant(model: MoaiMambaForCausalLM, out: Path, tokenizer_dir: Path | None = None) -> Path:
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, out / f.name)
    return out
