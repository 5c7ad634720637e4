"""Shared fixtures: a real byte-level BPE tokenizer trained on the sample corpus, and a tiny saved model."""

from __future__ import annotations

import itertools
import json
import os
import signal
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
    where triton is missing or its interpreter cannot run.

    The processes are forked, one per call, from a server started once per test process that has imported torch
    and nothing of triton or moai_lib (tests/interpreter_server.py): the same fresh start, without paying
    Python's and torch's start-up (~4 s) for each of the suite's dozen runs."""
    pytest.importorskip("triton")
    problem = interpreter_problem()
    if problem:
        pytest.skip(problem)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    server = None

    def run(script, *args: str, timeout: int = 300) -> dict:
        nonlocal server
        if server is None:
            server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "interpreter_server.py")], env=env,
                                      cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        server.stdin.write(json.dumps({"script": str(script), "args": list(args), "timeout": timeout}) + "\n")
        server.stdin.flush()
        line = server.stdout.readline()
        assert line, f"the interpreter server exited ({server.poll()})"
        reply = json.loads(line)
        assert reply["returncode"] == 0, f"exit {reply['returncode']}: {reply['stderr'][-4000:]}"
        return json.loads(reply["stdout"].strip().splitlines()[-1])

    yield run
    if server is not None:
        server.stdin.close()
        server.wait(timeout=60)


# Modules whose tests take a minute or more (pipeline runs, Triton-interpreter runs), longest first. They are run
# first, so that the xdist workers finish together instead of one of them ending on the DVC pipeline while the
# other sits idle; the rest follow in collection order. A scheduling hint only: a module missing from the list
# runs all the same, later.
LONG_MODULES = (
    "pipeline/test_dvc.py",
    "kernels/test_triton_gemv.py",
    "model/test_triton_mixer.py",
    "kernels/test_triton_scan_ckpt.py",
    "pipeline/test_mlflow_server.py",
    "kernels/test_triton_kernels.py",
    "kernels/test_triton_channels_last.py",
    "model/test_decode_step.py",
    "test_cli.py",
    "kernels/test_triton_scan_seg.py",
    "storage/test_s3_preflight.py",
    "kernels/test_triton_ce.py",
    "train/test_resume.py",
)


# Modules whose tests only read a pipeline run started in the background (`start_in_background`): last, so the
# run has had the rest of the suite's time to finish.
LAST_MODULES = ("flows/test_flow.py",)
_BACKGROUND: list[subprocess.Popen] = []


def _module_rank(item) -> int:
    path = Path(str(item.path)).resolve()
    rel = path.relative_to(ROOT / "tests").as_posix() if path.is_relative_to(ROOT / "tests") else ""
    if rel in LAST_MODULES:
        return len(LONG_MODULES) + 1
    return LONG_MODULES.index(rel) if rel in LONG_MODULES else len(LONG_MODULES)


def pytest_collection_finish(session):
    """Test modules that define `start_in_background(basetemp, items)` (the flow's: a Metaflow run that takes
    minutes and that its tests only read) get it called with their selected tests once the tests are collected,
    before any runs. Under xdist every worker calls it; the module starts its run once per session."""
    if session.config.option.collectonly:
        return
    selected: dict = {}
    for item in session.items:
        if isinstance(item, pytest.Function) and hasattr(item.module, "start_in_background"):
            selected.setdefault(item.module, []).append(item)
    for module, items in selected.items():
        proc = module.start_in_background(session.config._tmp_path_factory.getbasetemp(), items)
        if proc is not None:
            _BACKGROUND.append(proc)


def pytest_sessionfinish(session, exitstatus):
    """Wait for the background runs this process started (another worker may be reading one); stop them on
    an interrupted session."""
    for proc in _BACKGROUND:
        if exitstatus == pytest.ExitCode.INTERRUPTED and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (the S3 flow run, pretrain.sh under torchrun: minutes each) run only when asked for
    with `-m slow` (scripts/test.sh -m slow), so the default suite stays within ~10 minutes on 2 cores. The
    LONG_MODULES go first and the LAST_MODULES last (a stable sort: each module's tests keep their order)."""
    items.sort(key=_module_rank)
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown without pytest-xdist
def pytest_xdist_make_scheduler(config, log):
    """Under `-n N` (xdist's default `--dist load`), hand out whole modules, in collection order (LONG_MODULES
    first), each to the next free worker: a module's module-scoped fixtures (a DVC repository's `dvc repro`, an
    MLflow server, an interpreted run) are then made once, not once per worker that got some of its tests, and the
    DVC pipeline starts at once on one worker while the other takes the next modules. An explicit `--dist` other
    than `load` is left alone."""
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # xdist would sort modules by their number of tests
    return LoadFileScheduling(config, log)
