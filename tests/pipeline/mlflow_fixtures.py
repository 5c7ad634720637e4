"""Real MLflow stores for the tracking, registry, server and notebook tests (no mocks).

A fresh sqlite store costs ~10 s (MLflow creates and migrates its schema); a store copied from a template made
once per test session costs ~0.3 s. The template lives in pytest's session base temp dir, so every test
module that imports these fixtures shares one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

TEMPLATE_NAME = "mlflow_template.db"


def template_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow sqlite database, created once per session."""
    path = tmp_path_factory.getbasetemp() / TEMPLATE_NAME
    if not path.exists():
        from mlflow import MlflowClient

        building = path.with_suffix(".building")
        uri = f"sqlite:///{building}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments()  # creates the tracking tables
        client.search_registered_models()  # and the registry's
        building.rename(path)
    return path


def fresh_store(tmp_path_factory, directory: Path) -> str:
    """Copy the template to `directory/mlruns.db` (the default store location of a run root); its URI."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template_db(tmp_path_factory), directory / "mlruns.db")
    return f"sqlite:///{directory / 'mlruns.db'}"


def make_run_root(tmp_path_factory, tmp_path, monkeypatch) -> Path:
    """A run directory with params.yaml and a template-copied default store (`<root>/mlruns.db`);
    MLFLOW_TRACKING_URI, MOAI_PIPELINE_ID and DVC_STAGE unset so the defaults apply."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MOAI_PIPELINE_ID", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    root = tmp_path / "run"
    root.mkdir()
    (root / "params.yaml").write_text("pretrain:\n  learning_rate: 0.001\n")
    fresh_store(tmp_path_factory, root)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(backend_uri: str, artifacts_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free loopback port, in its own process group (it spawns a uvicorn worker), with
    one worker and MLflow's job runner off (it would start a dozen huey consumers). Returns (Popen, URL) at
    once: call `wait_healthy`, and `stop_process_group` after."""
    port = free_port()
    log = open(log_path, "wb")  # noqa: SIM115 - closed by stop_process_group
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts_dir)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    proc.moai_log = log
    proc.moai_log_path = log_path
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float = 240.0) -> None:
    """Poll GET /health until it answers 200 (~35-60 s on a busy 2-core machine)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n"
                               f"{proc.moai_log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {timeout_s} s:\n"
                       f"{proc.moai_log_path.read_text(errors='replace')[-3000:]}")


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (server and workers), SIGKILL what is left after 10 s."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)
    log = getattr(proc, "moai_log", None)
    if log is not None:
        log.close()


# Exported tiny models and the comparison table, as the export and report stages leave them ---------------------

# ppl / size chosen so the champion rule has something to decide: rtn is the smallest within 5 % of bf16,
# qat the smallest within 3 %.
RESULTS = [
    {"variant": "bf16", "method": "none", "ppl": 10.0, "size_mb": 1.0, "prefill_tok_s": 900.0, "decode_tok_s": 50.0},
    {"variant": "qat", "method": "qat", "ppl": 10.2, "size_mb": 0.9, "prefill_tok_s": 950.0, "decode_tok_s": 55.0},
    {"variant": "rtn", "method": "rtn", "ppl": 10.4, "size_mb": 0.4, "prefill_tok_s": 1000.0, "decode_tok_s": 60.0},
]


class Params:
    """Stand-in for PipelineParams: the attributes register_and_promote uses, with the default paths."""

    def __init__(self, root: Path, register, tracking, variants=("bf16", "qat", "rtn")):
        self.root, self.register, self.tracking, self._variants = root, register, tracking, list(variants)

    def variants(self) -> list[str]:
        return self._variants

    def path(self, key: str, **fmt) -> Path:
        return {"export": lambda: self.root / "outputs" / "exports" / fmt["variant"],
                "reports": lambda: self.root / "reports"}[key]()


def export_variant(source: Path, tokenizer_dir: Path, out: Path, *, seed: int, quantize: bool) -> None:
    """A perturbed copy of the tiny model (INT4 RTN-quantized when `quantize`) exported by the export stage's
    `export_model` (a real HF directory with tokenizer and model card) to `out`."""
    import torch

    from moai_lib import MoaiMambaForCausalLM
    from moai_lib.pipeline.export import ExportParams, export_model
    from moai_lib.quant import IntWeightOnlyConfig, quantize_

    model = MoaiMambaForCausalLM.from_pretrained(source)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    if quantize:
        quantize_(model, IntWeightOnlyConfig(bits=4, group_size=32))
    staging = out.parent / f".src-{out.name}"
    model.save_pretrained(staging)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, staging / f.name)
    metrics = next(r for r in RESULTS if r["variant"] == out.name)
    export_model(staging, out, variant=out.name, metrics=metrics,
                 params=ExportParams(sources=None, verify=False, remote_code=False))
    shutil.rmtree(staging)


def make_exports(root: Path, tiny_model_dir: Path, tokenizer_dir: Path, variants=("bf16", "qat", "rtn")) -> Path:
    """`root` as a run directory after export + report: outputs/exports/<variant>/ and reports/."""
    from moai_lib.pipeline.report import write_report

    for seed, variant in enumerate(variants):
        export_variant(tiny_model_dir, tokenizer_dir, root / "outputs" / "exports" / variant, seed=seed,
                       quantize=variant == "rtn")
    write_report([r for r in RESULTS if r["variant"] in variants], root / "reports")
    return root
