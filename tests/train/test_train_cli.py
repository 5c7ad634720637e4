"""`moai train` and `moai tokenize`: a quick run, QAT, and bad inputs (one-line error, exit 2, nothing trained)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import moai_lib.train
from moai_lib import cli

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any bad-input case gets as far as the training loop."""
    def refuse(*args, **kwargs):
        raise AssertionError("pretrain was called: the input should have been rejected before training")

    monkeypatch.setattr(moai_lib.train, "pretrain", refuse)


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"moai {command}: error: "), err
    return err[-1]


def test_train_test_flag_runs_and_saves_a_loadable_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert cli.main(["train", "--test", "--output_dir", str(out), "--max_steps", "3", "--batch_size", "2",
                     "--max_length", "32"]) == 0
    stdout = capsys.readouterr().out
    assert "step 3/3" in stdout and "tokens/s" in stdout and "saved the model to" in stdout
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.vocab_size == 512  # the tiny preset
    assert json.loads((out / "metrics.json").read_text())["step"] == 3


def test_train_quantize_runs_qat_and_converts(tmp_path, capsys):
    out = tmp_path / "qat"
    assert cli.main(["train", "--test", "--output_dir", str(out), "--max_steps", "2", "--batch_size", "2",
                     "--max_length", "32", "--quantize", "--bits", "4", "--group_size", "32"]) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["use_quantization"] is True and config["quantization_bits"] == 4
    assert config["quantization_config"]["methods"][0]["method"] == "qat"


@pytest.fixture(scope="module")
def small_config_dir(tmp_path_factory):
    """JSON configs for the bad-input cases: `small` has 64 positions, `narrow` a 256-token vocabulary."""
    from moai_lib import get_mamba_config

    root = tmp_path_factory.mktemp("configs")
    get_mamba_config("tiny", vocab_size=512, max_position_embeddings=64).save_pretrained(root / "small")
    get_mamba_config("tiny", vocab_size=256).save_pretrained(root / "narrow")
    return root


@pytest.mark.parametrize("case, extra, needle", [
    ("negative_lr", ["--learning_rate", "-0.001"], "learning_rate must be a finite number > 0, got -0.001"),
    ("zero_batch", ["--batch_size", "0"], "batch_size must be an integer ≥ 1"),
    ("batch_larger_than_data", ["--batch_size", "4096", "--gradient_accumulation_steps", "8"],
     "= 32768 sequences per step, but the training split has only"),
    ("missing_data_dir", ["--data_dir", "MISSING"], "data directory 'MISSING' does not exist"),
    ("not_a_data_dir", ["--data_dir", "TMP"], "has no index.json: not a packed data directory"),
    ("block_too_long", ["--config", "small"], "sequence length 128 (block_size/max_length) exceeds the model's "
                                              "max_position_embeddings 64"),
    ("vocab_too_small", ["--config", "narrow"], "the data's tokenizer has 512 tokens but the model's vocab_size "
                                                "is 256"),
    ("max_length_not_dividing", ["--max_length", "100"], "max_length 100 must be ≥ 2 and divide"),
    ("config_and_model_path", ["--model_path", "TMP"], "give --config (train a new model) or --model_path"),
    ("unknown_preset", ["--config", "3b"], "config '3b' is neither a file nor a preset name"),
    ("params_file_typo", ["--params", "PARAMS"], "unknown training parameter(s) learnin_rate"),
    ("qat_group_size", ["--quantize", "--group_size", "48"], "group"),
])
def test_train_bad_inputs_exit_2_before_training(case, extra, needle, tmp_path, capsys, no_training,
                                                 sample_shards, small_config_dir):
    extra = [str(tmp_path) if a == "TMP" else str(small_config_dir / a) if a in ("small", "narrow") else a
             for a in extra]
    if "PARAMS" in extra:
        (tmp_path / "params.json").write_text(json.dumps({"learnin_rate": 1e-3}))
        extra[extra.index("PARAMS")] = str(tmp_path / "params.json")
    args = ["train", "--output_dir", str(tmp_path / "out")]
    if "--config" not in extra:
        args += ["--config", "tiny"]
    if "--data_dir" not in extra:
        args += ["--data_dir", str(sample_shards)]
    assert cli.main(args + extra) == 2
    assert needle in one_line_error(capsys, "train")
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "model").exists()


def test_train_needs_a_model_and_data(capsys, tmp_path, no_training):
    assert cli.main(["train", "--data_dir", str(tmp_path)]) == 2
    assert "train needs --config" in one_line_error(capsys, "train")
    assert cli.main(["train", "--config", "tiny"]) == 2
    assert "train needs --data_dir" in one_line_error(capsys, "train")


def test_tokenize_cli_writes_shards_and_stats(tmp_path, capsys, sample_tokenizer_dir):
    out = tmp_path / "packed"
    assert cli.main(["tokenize", "--corpus", str(SAMPLE / "valid.jsonl"), "--out", str(out), "--tokenizer",
                     str(sample_tokenizer_dir), "--block_size", "64", "--valid_fraction", "0.2",
                     "--num_proc", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "train: 44 documents" in stdout and "valid: 11 documents" in stdout and "en " in stdout
    assert (out / "index.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("extra, needle", [
    (["--corpus", "nothing-*.jsonl", "--vocab_size", "512"], "corpus glob 'nothing-*.jsonl' matches no files"),
    (["--corpus", "SAMPLE", "--vocab_size", "100"], "vocab_size must be an integer > 258"),
    (["--corpus", "SAMPLE", "--tokenizer", "no-such-tokenizer"], "tokenizer directory 'no-such-tokenizer' does not"),
    (["--corpus", "SAMPLE", "--vocab_size", "512", "--block_size", "1"], "block_size must be an integer ≥ 2"),
])
def test_tokenize_bad_inputs_exit_2(extra, needle, tmp_path, capsys):
    extra = [str(SAMPLE / "valid.jsonl") if a == "SAMPLE" else a for a in extra]
    assert cli.main(["tokenize", "--out", str(tmp_path / "out"), *extra]) == 2
    assert needle in one_line_error(capsys, "tokenize")
    assert not (tmp_path / "out").exists()
