"""The bad-input table of RELIABILITY.md, executed: each case runs the `moai` command in-process on a run root
that already holds outputs (a tokenized dataset, a trained model, metrics), and checks that

- the command fails with the usage exit status and ONE line on stderr that names the problem (the expected
  fragments) — not a traceback from deep inside torch;
- nothing under the run root changed (no output modified, deleted or half-written).

`MOAI_RELIABILITY_ROWS=rows.md scripts/test.sh tests/test_bad_inputs.py -n 0` appends each case's row (with the
real message) to rows.md: the table of RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "pipeline"))
from pipeline_helpers import REPO, make_root  # noqa: E402

from moai_lib.cli import EXIT_USAGE, main  # noqa: E402


@dataclass(frozen=True)
class Case:
    id: str
    area: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]  # fragments the one-line message must contain
    env: dict = field(default_factory=dict)


CASES = [
    # config
    Case("unknown-preset", "config", ("model-info", "--config", "3b"), ("'3b'", "presets", "2b")),
    Case("config-invalid-value", "config", ("model-info", "--config", "bad_config.json"), ("state_size",)),
    Case("config-not-json", "config", ("model-info", "--config", "broken.json"), ("broken.json", "JSON")),
    Case("config-scan-checkpoint-interval", "config", ("model-info", "--config", "bad_checkpointing.json"),
         ("scan_checkpoint_every", "256")),
    # params
    Case("params-missing", "params", ("stage", "pretrain", "--params", "nope.yaml"), ("nope.yaml",)),
    Case("params-not-yaml", "params", ("stage", "pretrain", "--params", "broken.yaml"), ("broken.yaml",)),
    Case("params-unknown-key", "params", ("stage", "pretrain", "-S", "pretrain.lr=1e-3"),
         ("pretrain.lr", "learning_rate")),
    Case("negative-lr", "params", ("stage", "pretrain", "-S", "pretrain.learning_rate=-1e-3"), ("learning_rate",)),
    Case("batch-larger-than-data", "params", ("stage", "pretrain", "-S", "pretrain.batch_size=100000"),
         ("batch",)),
    Case("output-path-escapes-root", "params", ("stage", "pretrain", "-S", "paths.models=../elsewhere"),
         ("paths.models",)),
    # corpus
    Case("corpus-missing", "corpus", ("stage", "tokenize", "-S", "tokenize.corpus=data/none.jsonl"),
         ("data/none.jsonl",)),
    Case("corpus-empty", "corpus", ("stage", "tokenize", "-S", "tokenize.corpus=data/empty.jsonl"),
         ("empty.jsonl",)),
    Case("corpus-undecodable", "corpus", ("stage", "tokenize", "-S", "tokenize.corpus=data/latin1.jsonl"),
         ("latin1.jsonl", "UTF-8")),
    Case("corpus-no-text-field", "corpus", ("stage", "tokenize", "-S", "tokenize.corpus=data/notext.jsonl"),
         ("notext.jsonl", "text")),
    Case("corpus-s3-url", "corpus", ("stage", "tokenize", "-S", "tokenize.corpus=s3://moai-data/corpus/train.jsonl"),
         ("tokenize.corpus", "s3://moai-data/corpus/train.jsonl", "dvc import-url")),
    # tokenizer
    Case("tokenizer-missing", "tokenizer",
         ("stage", "tokenize", "-S", "tokenize.vocab_size=null", "-S", "tokenize.tokenizer=no_such_tokenizer"),
         ("tokenize.tokenizer", "no_such_tokenizer")),
    Case("vocab-too-small", "tokenizer", ("stage", "tokenize", "-S", "tokenize.vocab_size=100"), ("vocab_size",)),
    # checkpoints
    Case("pickle-checkpoint-refused", "checkpoint",
         ("generate", "--model_path", "pickled_model", "--tokenizer_path", "outputs/models/pretrain",
          "--prompt", "hi"), ("safetensors", ".bin")),
    Case("checkpoint-config-invalid", "checkpoint",
         ("generate", "--model_path", "bad_model", "--tokenizer_path", "outputs/models/pretrain", "--prompt", "hi"),
         ("bad_model", "conv_kernel")),
    Case("resume-from-other-preset", "checkpoint",
         ("train", "--config", "outputs/models/pretrain/config.json", "--check_only", "--output_dir", "other_run",
          "--data_dir", "outputs/data", "--max_steps", "4", "--batch_size", "2"), ("different model",)),
    # quantization
    Case("unknown-quant-method", "quantization", ("stage", "quantize", "--method", "int3"), ("int3", "int4")),
    Case("quant-bits-invalid", "quantization", ("stage", "quantize", "--method", "int4",
                                                "-S", "quantize.methods.int4.bits=3"), ("bits",)),
    Case("group-size-not-dividing", "quantization",
         ("stage", "quantize", "--method", "int4", "-S", "quantize.methods.int4.group_size=128"),
         ("quantize.methods.int4.group_size", "128")),
    Case("group-size-unsupported", "quantization",
         ("stage", "quantize", "--method", "int4", "-S", "quantize.methods.int4.group_size=48"), ("group_size", "48")),
    Case("qat-group-size", "quantization", ("stage", "qat", "-S", "qat.group_size=100"), ("qat.group_size",)),
    # environment
    Case("tracking-server-down", "environment", ("stage", "pretrain", "-S", "tracking.enabled=true",
                                                 "-S", "tracking.timeout_s=2"),
         ("MLFLOW_TRACKING_URI", "127.0.0.1:9"), env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
    Case("s3-artifact-root-no-credentials", "environment",
         ("stage", "pretrain", "-S", "tracking.enabled=true", "-S", "tracking.artifact_location=s3://moai-runs/mlflow"),
         ("s3://moai-runs/mlflow", "tracking.artifact_location", "no AWS credentials", "AWS_ACCESS_KEY_ID"),
         env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/c",
              "AWS_CONFIG_FILE": "/nonexistent/c", "AWS_EC2_METADATA_DISABLED": "true"}),
    Case("cuda-requested-without-gpu", "environment",
         ("generate", "--model_path", "outputs/models/pretrain", "--tokenizer_path", "outputs/models/pretrain",
          "--prompt", "hi", "--device", "cuda"), ("cuda",)),
]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root (relative path → sha256 of its bytes and mode)."""
    state = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            state[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A run root on the tiny profile after tokenize and pretrain, plus the bad files the cases point at."""
    root = make_root(tmp_path_factory.mktemp("bad_inputs"))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in ("tokenize", "pretrain"):
            assert main(["stage", stage, "--params", "params.yaml"]) == 0
        # a training run of another model shape (3 layers), to resume from with the tiny preset (2 layers)
        other = json.loads((root / "outputs/models/pretrain/config.json").read_text())
        Path("other_config.json").write_text(json.dumps({**_config_fields(other), "num_hidden_layers": 3}))
        assert main(["train", "--config", "other_config.json", "--data_dir", "outputs/data", "--output_dir",
                     "other_run", "--max_steps", "2", "--batch_size", "2", "--save_every", "1"]) == 0
    finally:
        os.chdir(cwd)
    (root / "bad_config.json").write_text(json.dumps({"hidden_size": 64, "state_size": 0}))
    (root / "broken.json").write_text("{hidden_size: 64,")
    (root / "bad_checkpointing.json").write_text(json.dumps({"hidden_size": 64, "scan_checkpoint_every": 100}))
    (root / "broken.yaml").write_text("pretrain: [unclosed\n")
    (root / "data" / "empty.jsonl").write_text("")
    (root / "data" / "latin1.jsonl").write_bytes('{"text": "caf\u00e9 cr\u00e8me"}\n'.encode("latin-1"))
    (root / "data" / "notext.jsonl").write_text('{"body": "no text field here"}\n')
    pickled = root / "pickled_model"
    pickled.mkdir()
    shutil.copyfile(root / "outputs/models/pretrain/config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    bad = root / "bad_model"
    shutil.copytree(root / "outputs/models/pretrain", bad)
    config = json.loads((bad / "config.json").read_text())
    config["conv_kernel"] = 0
    (bad / "config.json").write_text(json.dumps(config))
    return root


def _config_fields(config: dict) -> dict:
    from moai_lib.config import MoaiMambaConfig

    code = MoaiMambaConfig.__init__.__code__
    return {k: v for k, v in config.items() if k in code.co_varnames[1:code.co_argcount]}


def run_case(case: Case, root: Path, capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.chdir(root)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    argv = list(case.argv)
    if argv[0] in ("stage", "promote") and "--params" not in argv:
        argv += ["--params", "params.yaml"]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_clearly_and_changes_nothing(case, template, tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    shutil.copytree(template, root, symlinks=True)
    before = tree_digest(root)
    rc, err = run_case(case, root, capsys, monkeypatch)
    assert rc == EXIT_USAGE, f"{case.id}: exit {rc}, stderr:\n{err}"
    lines = [line for line in err.splitlines() if line.startswith("moai ")]
    assert lines, f"{case.id}: no 'moai …: error:' line in:\n{err}"
    message = lines[-1]
    assert "Traceback" not in err, err
    for fragment in case.expect:
        assert fragment in message, f"{case.id}: {fragment!r} not in {message!r}"
    after = tree_digest(root)
    new = sorted(set(after) - set(before))
    assert not new or all(p.startswith("mlruns") for p in new), f"{case.id}: wrote {new}"
    assert {k: v for k, v in after.items() if k in before} == before, f"{case.id}: modified existing files"
    if os.environ.get("MOAI_RELIABILITY_ROWS"):
        command = "moai " + " ".join(case.argv)
        text = message.replace(str(root), "<root>").replace("|", "\\|")
        with open(os.environ["MOAI_RELIABILITY_ROWS"], "a", encoding="utf-8") as f:
            f.write(f"| `{case.id}` | {case.area} | `{command}` | {text} |\n")


def test_reliability_table_lists_every_case():
    text = (REPO / "RELIABILITY.md").read_text(encoding="utf-8")
    missing = [c.id for c in CASES if f"`{c.id}`" not in text]
    assert not missing, f"RELIABILITY.md lacks {missing}: regenerate it with `python tests/test_bad_inputs.py`"
    assert len(CASES) >= 20
