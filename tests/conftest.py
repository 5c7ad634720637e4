"""Shared fixtures: a real byte-level BPE tokenizer trained on the sample corpus, and a tiny saved model."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = ROOT / "data" / "sample"
TOKENIZER_VOCAB_SIZE = 512  # 256 byte symbols + 2 specials + 254 merges: trains in well under a second
TOKENIZER_TRAIN_DOCS = 200


@pytest.fixture(scope="session")
def sample_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 512, eos `<|endoftext|>`, pad `<|pad|>`) trained on the first 200
    documents of data/sample/train.jsonl, saved with `PreTrainedTokenizerFast.save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    with open(SAMPLE_DIR / "train.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in itertools.islice(f, TOKENIZER_TRAIN_DOCS)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")
    path = tmp_path_factory.mktemp("sample_tokenizer")
    wrapped.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sample_tokenizer_dir) -> Path:
    """The `tiny` preset sized to the sample tokenizer, randomly initialised (seed 0), saved as safetensors."""
    from transformers import AutoTokenizer

    from moai_lib import MoaiMambaForCausalLM, get_mamba_config

    tokenizer = AutoTokenizer.from_pretrained(sample_tokenizer_dir)
    config = get_mamba_config("tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = MoaiMambaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    return path


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run here, or None. Triton < 3.9's interpreter calls int() on 1-element
    arrays (loop bounds), which NumPy 2.4 rejects; Triton 3.9 (requirements/test.txt) is fine."""
    from importlib.metadata import version

    import numpy as np

    if tuple(int(p) for p in version("triton").split(".")[:2]) < (3, 9):
        try:
            int(np.array([1]))
        except TypeError:
            return f"Triton {version('triton')}'s interpreter does not work with NumPy {np.__version__}"
    return None


@pytest.fixture(scope="session")
def run_interpreted():
    """run_interpreted(script, *args) -> the JSON that `python script *args` prints on its last stdout line, run in
    a fresh process with Triton's CPU interpreter on (TRITON_INTERPRET=1 must be set before triton is first
    imported, and importing moai_lib imports it). The Triton kernel tests run their comparisons this way. Skips
    where triton is missing or its interpreter cannot run."""
    pytest.importorskip("triton")
    problem = interpreter_problem()
    if problem:
        pytest.skip(problem)

    def run(script, *args: str, timeout: int = 300) -> dict:
        env = {**os.environ, "TRITON_INTERPRET": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (the S3 flow run, pretrain.sh under torchrun: minutes each) run only when asked for
    with `-m slow` (scripts/test.sh -m slow), so the default suite stays within ~10 minutes on 2 cores."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
