"""A run root on the tiny profile: params.yaml (params/tiny.yaml) and a small slice of the sample corpus.

The slice (the first documents of data/sample, in the same paths the profile names) keeps every stage at
seconds on one core while the text stays real multilingual text, so the tokenizer, packing and per-language
metrics see what they see on the full sample.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
TRAIN_DOCS, VALID_DOCS = 30, 8
VENV_BIN = Path(sys.executable).parent


def tiny_params() -> dict:
    return yaml.safe_load((REPO / "params" / "tiny.yaml").read_text(encoding="utf-8"))


def write_params(root: Path, data: dict) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def make_root(root: Path, params: dict | None = None) -> Path:
    """`root` with data/sample/{train,valid}.jsonl (a slice), SOURCES.md and params.yaml; returns root."""
    (root / "data" / "sample").mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", TRAIN_DOCS), ("valid.jsonl", VALID_DOCS)):
        with open(SAMPLE / name, encoding="utf-8") as src, open(root / "data" / "sample" / name, "w",
                                                                 encoding="utf-8") as dst:
            dst.writelines(itertools.islice(src, n))
    shutil.copyfile(SAMPLE / "SOURCES.md", root / "data" / "sample" / "SOURCES.md")
    write_params(root, params if params is not None else tiny_params())
    return root


def make_dvc_repo(root: Path) -> Path:
    """A git repository (one commit) with the project's dvc.yaml, the code its stages depend on, the tiny
    profile as params.yaml, the corpus slice and `dvc init`: what `dvc repro` / `dvc exp run` need."""
    make_root(root)
    shutil.copytree(REPO / "moai_lib", root / "moai_lib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copyfile(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copyfile(REPO / ".dvcignore", root / ".dvcignore")
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    run([dvc(), "init", "-q"], root)
    run([dvc(), "config", "core.analytics", "false"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny pipeline"], root)
    return root


def dvc() -> str:
    return str(VENV_BIN / "dvc")


def env() -> dict:
    """The stages' environment: `moai` from this interpreter's venv first on PATH, one thread, offline."""
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "DVC_NO_ANALYTICS": "1"}


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


def tree_state(path: Path) -> dict[str, tuple[int, int]]:
    """{relative file: (size, mtime_ns)} of everything under path (to assert that nothing changed)."""
    return {os.fspath(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}
