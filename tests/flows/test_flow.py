"""The Metaflow flow end to end on the tiny profile: real Metaflow (Runner, local datastore and metadata in a
temp dir), real stages, MLflow tracking and registry in a temp sqlite store; checked through Metaflow's Client
API and MLflow's client.

One run serves both tests: the params have a working quantize method (`int4`, RTN) and one that passes
validation but fails at quantization time (`head`: GPTQ of the LM head, which is tied to the embeddings in the
tiny preset; GPTQ refuses to untie them). Each flow step is a fresh Python process importing torch and
moai_lib, so the run takes minutes of CPU, not seconds: it is started in the background as soon as the tests are
collected, and this module's tests run last (conftest.py).
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

import pytest
import yaml

if importlib.util.find_spec("metaflow") is None or importlib.util.find_spec("mlflow") is None:
    pytest.skip("needs metaflow and mlflow (the pipeline extras)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
FLOW = REPO / "flows" / "moai_flow.py"
SAMPLE = REPO / "data" / "sample"
METHODS = {"int4": {"method": "rtn", "bits": 4, "group_size": 32},
           "head": {"method": "gptq", "bits": 4, "group_size": 32, "layers": ["lm_head"]}}


def _launch_dir(base: Path, methods: dict) -> tuple[Path, dict, str]:
    """A launch directory under `base`: the tiny profile as params.yaml (MLflow to a sqlite store under `base`,
    no retries) and a cut-down copy of the sample corpus. Returns (directory, params, tracking URI)."""
    work = base / "work"
    (work / "data" / "sample").mkdir(parents=True)
    for name, docs in (("train.jsonl", 120), ("valid.jsonl", 16)):
        with open(SAMPLE / name, encoding="utf-8") as src, open(work / "data" / "sample" / name, "w") as dst:
            dst.writelines(itertools.islice(src, docs))
    shutil.copyfile(SAMPLE / "SOURCES.md", work / "data" / "sample" / "SOURCES.md")

    params = yaml.safe_load((REPO / "params" / "tiny.yaml").read_text(encoding="utf-8"))
    uri = f"sqlite:///{base / 'mlflow' / 'mlruns.db'}"
    params["quantize"]["methods"] = methods
    params["tracking"] = {"enabled": True, "tracking_uri": uri}
    params["resources"] = {step: {"retries": 0} for step in ("quantize", "evaluate")}  # no retry of a sure failure
    params["resources"]["pretrain"] = {"nodes": 2}  # two local @parallel tasks, each running torchrun (gloo)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return work, params, uri


def _env(base: Path, **extra) -> dict[str, str]:
    return {"METAFLOW_USER": "tester", "METAFLOW_DEFAULT_DATASTORE": "local", "METAFLOW_DEFAULT_METADATA": "local",
            "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(base / "metaflow"), "METAFLOW_HOME": str(base / "metaflow_home"),
            "MOAI_FLOW_WORKDIR": str(base / "steps"), "HF_DATASETS_CACHE": str(base / "hf_datasets"),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MLFLOW_TRACKING_URI": "",
            "MOAI_PIPELINE_ID": "", **extra}


def _shared_base(basetemp: Path) -> Path:
    """The session's temp dir, common to all pytest-xdist workers (each worker's own is a `popen-gwN` in it)."""
    return basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp


def start_in_background(basetemp: Path, items=None) -> subprocess.Popen | None:
    """Start the session's one run of the flow (`_run_flow`, this file run as a script) in a process of its own,
    unless a test process of this session (an xdist worker) already has. conftest.py calls this with this
    module's selected tests as soon as the tests are collected, so the run goes on while the workers run the rest
    of the suite; this module's tests run last and only read it. Returns the process, or None where it was
    already started or no selected test needs it."""
    from filelock import FileLock

    if items is not None and not any("flow_run" in item.fixturenames for item in items):
        return None

    shared = _shared_base(basetemp)
    base = shared / "moai_flow"
    with FileLock(str(shared / "moai_flow.lock")):
        if base.exists():
            return None
        base.mkdir()
        with open(base / "launcher.log", "w") as log:
            proc = subprocess.Popen([sys.executable, __file__, str(base)], stdout=log, stderr=subprocess.STDOUT,
                                    cwd=REPO, start_new_session=True)
        (base / "launcher.pid").write_text(str(proc.pid))
        return proc


def _run_flow(base: Path) -> None:
    """The launcher process: one run of the flow with Metaflow's Runner, its outcome in `base`/run.json."""
    env = _env(base)
    os.environ.update(env)  # Metaflow reads its settings when imported: set them for this process too
    from metaflow import Runner, namespace

    namespace(None)
    result = {"status": "not started"}
    try:
        work, params, uri = _launch_dir(base, METHODS)
        result.update(uri=uri, params=params)
        with Runner(str(FLOW), pylint=False, show_output=False, cwd=str(work), env=env).run(
                max_workers=2) as running:
            result.update(status=running.status, stdout=running.stdout, stderr=running.stderr)
            if running.status == "successful":
                result["pathspec"] = running.run.pathspec
        result["step_files_left"] = [str(p) for p in (base / "steps").rglob("*") if p.is_file()]
    except BaseException:
        result["error"] = traceback.format_exc()
        raise
    finally:
        (base / "run.json.tmp").write_text(json.dumps(result))
        (base / "run.json.tmp").replace(base / "run.json")


def _alive(pid: int) -> bool:
    """Whether process `pid` is running (a zombie, dead but not yet reaped by the worker that started it, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """(Metaflow Run, tracking URI, params dict, stdout) of one finished run of the flow on the tiny profile.

    The run is made once per test session, also under pytest-xdist: started in the background when the tests are
    collected (`start_in_background`; here, if nothing started it yet), waited for here, in whichever worker gets
    this module, and read through the Client API."""
    basetemp = tmp_path_factory.getbasetemp()
    start_in_background(basetemp)
    base = _shared_base(basetemp) / "moai_flow"
    done, deadline = base / "run.json", time.monotonic() + 1800
    while not done.exists():
        log = (base / "launcher.log").read_text()[-5000:]
        assert _alive(int((base / "launcher.pid").read_text())), f"the flow launcher died:\n{log}"
        assert time.monotonic() < deadline, f"the flow run took over 30 minutes:\n{log}"
        time.sleep(1)
    info = json.loads(done.read_text())
    assert info["status"] == "successful", (info.get("error", "") + info.get("stderr", "")[-5000:]
                                            + info.get("stdout", "")[-5000:])
    assert not info["step_files_left"], "step roots left behind"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _env(base).items():
            mp.setenv(key, value)
        from metaflow import Run, metadata, namespace

        namespace(None)
        metadata(f"local@{base / 'metaflow'}")  # metaflow may have been imported before the env was set
        yield Run(info["pathspec"]), info["uri"], info["params"], info["stdout"]


def _task(run, step_name, **data):
    """The one task of `step_name` whose artifacts match `data`."""
    found = [t for t in run[step_name] if all(getattr(t.data, k) == v for k, v in data.items())]
    assert len(found) == 1, (step_name, data, len(found))
    return found[0]


def test_flow_runs_every_stage_and_promotes_a_champion(flow_run):
    from mlflow import MlflowClient

    run, uri, params, stdout = flow_run
    assert run.successful
    steps = {s.id: list(s) for s in run}
    assert set(steps) == {"start", "tokenize", "pretrain", "pretrain_join", "qat", "quantize", "join",
                          "evaluate_variants", "evaluate", "report", "export", "promote", "end"}
    for name, tasks in steps.items():
        if name != "quantize":  # the failed branch is caught, not successful (next test)
            assert all(t.successful for t in tasks), name

    # one quantize branch per method
    assert sorted(t.data.method for t in steps["quantize"]) == sorted(METHODS)
    int4 = _task(run, "quantize", method="int4")
    assert int4.successful and int4.data.quantize_error is None
    assert int4.data.metrics["method"] == "rtn"

    # stage metrics are artifacts: per task (`metrics`) and for the whole run (`results` of the end step)
    tokenize = run["tokenize"].task.data.metrics
    assert 256 < tokenize["vocab_size"] <= params["tokenize"]["vocab_size"] and tokenize["train_tokens"] > 0
    pretrain = run["pretrain_join"].task.data.metrics
    assert pretrain["completed"] and math.isfinite(pretrain["val_ppl"])
    # resources.pretrain.nodes = 2: two @parallel tasks, one torchrun each, trained as one 2-process DDP run
    assert len(steps["pretrain"]) == 2 and pretrain["num_processes"] == 2 and pretrain["distributed"] == "ddp"
    evaluations = {t.data.variant: t.data.metrics for t in steps["evaluate"]}
    assert sorted(evaluations) == ["bf16", "int4", "qat"]
    for variant, m in evaluations.items():
        assert m["variant"] == variant and math.isfinite(m["ppl"]) and m["size_bytes"] > 0
    assert evaluations["int4"]["size_bytes"] < evaluations["bf16"]["size_bytes"]
    results = run.data.results
    assert {"tokenize", "pretrain", "qat", "quantize_int4", "evaluate_bf16", "report", "export"} <= set(results)
    assert results["evaluate_int4"] == evaluations["int4"]

    # outputs travel as tar artifacts: the report's table, one export per variant
    with tarfile.open(fileobj=io.BytesIO(run.data.report_bundle)) as tar:
        names = tar.getnames()
        table = tar.extractfile("reports/comparison.csv").read().decode()
    assert "reports/comparison.md" in names
    assert all(v in table for v in ("bf16", "qat", "int4"))
    with tarfile.open(fileobj=io.BytesIO(run.data.export_bundle)) as tar:
        exported = {Path(n).parts[2] for n in tar.getnames() if n.startswith("outputs/exports/")}
    assert exported == {"bf16", "qat", "int4"}

    # the champion is one of the variants, and MLflow agrees (alias `champion` on the registered model)
    assert run.data.champion in {"bf16", "qat", "int4"}
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(run.data.promotion["model_name"], "champion")
    assert str(version.version) == str(run.data.promotion["version"])
    assert run.data.promotion["versions"][run.data.champion] == run.data.promotion["version"]
    # every stage was tracked under the Metaflow run id
    stages = client.search_runs([client.get_experiment_by_name("moai").experiment_id],
                                f"tags.`moai.metaflow_run_id` = '{run.id}'")
    labels = {r.data.tags.get("moai.stage") for r in stages}
    assert {"tokenize", "pretrain", "qat", "quantize@int4", "evaluate@bf16", "report", "export"} <= labels
    assert f"champion: {run.data.champion}" in stdout


def test_a_failing_quantize_method_is_caught_and_the_run_goes_on(flow_run):
    run, _, _, stdout = flow_run
    head = _task(run, "quantize", method="head")
    assert head.data.quantize_error is not None
    assert "QuantizationError" in repr(head.data.quantize_error)

    failed = run.data.failed_methods
    assert list(failed) == ["head"] and "QuantizationError" in failed["head"] and "lm_head" in failed["head"]
    assert "quantize@head FAILED" in stdout
    # the other branches went on: no variant, evaluation or export for the failed method
    assert sorted(run["join"].task.data.quantized_bundles) == ["int4"]
    assert run.data.variants == ["bf16", "qat", "int4"]
    assert "head" not in run.data.evaluations
    assert not any(k.endswith("_head") for k in run.data.results)


def test_the_code_package_ships_moai_lib_and_the_local_inputs(tmp_path):
    """What `--with kubernetes/batch` uploads: moai_lib (with the C++ scan source) and the input files the
    params name (corpus glob, SOURCES.md), but nothing above the launch directory."""
    (tmp_path / "corpus").mkdir()
    for name in ("a.jsonl", "b.jsonl", "SOURCES.md"):
        (tmp_path / "corpus" / name).write_text('{"text": "hello"}\n')
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jsonl"
    outside.write_text('{"text": "far"}\n')
    params = {"tokenize": {"corpus": ["corpus/*.jsonl", f"../{outside.name}"], "vocab_size": 300},
              "export": {"sources": "corpus/SOURCES.md"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {"PATH": "/usr/bin:/bin", "METAFLOW_USER": "tester", "METAFLOW_DEFAULT_DATASTORE": "local",
           "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "mf"), "METAFLOW_HOME": str(tmp_path / "mf_home")}
    out = subprocess.run([sys.executable, str(FLOW), "--no-pylint", "package", "list"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    files = {line.strip() for line in (out.stdout + out.stderr).splitlines()}  # Metaflow echoes to stderr
    expected = {str(FLOW), str(REPO / "moai_lib" / "__init__.py"), str(REPO / "moai_lib" / "pipeline" / "stages.py"),
                str(tmp_path / "corpus" / "a.jsonl"), str(tmp_path / "corpus" / "b.jsonl"),
                str(tmp_path / "corpus" / "SOURCES.md")}
    assert expected <= files, expected - files
    assert any(f.endswith(".cpp") for f in files)
    assert not any("outside" in f for f in files)


@pytest.mark.slow
def test_the_flow_moves_its_data_through_an_s3_datastore(tmp_path):
    """The same flow with Metaflow's S3 datastore on a local S3 server (moto): every artifact, the stage outputs
    included, goes through S3, as when the steps run on different machines (`--with kubernetes/batch`)."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server._server.server_port}"
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        s3.create_bucket(Bucket="moai-flow")
        work, _, _ = _launch_dir(tmp_path, {"int4": METHODS["int4"]})
        env = {**_env(tmp_path, METAFLOW_DEFAULT_DATASTORE="s3", METAFLOW_DATASTORE_SYSROOT_S3="s3://moai-flow/metaflow",
                      METAFLOW_S3_ENDPOINT_URL=endpoint, **creds), "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, str(FLOW), "--no-pylint", "run", "--max-workers", "2"], cwd=work,
                             env=env, capture_output=True, text=True, timeout=1800)
        assert out.returncode == 0, out.stderr[-5000:] + out.stdout[-5000:]
        assert "champion: " in out.stdout + out.stderr
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="moai-flow")
                for o in page.get("Contents", [])]
        sizes = [o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="moai-flow")
                 for o in page.get("Contents", [])]
        assert any(k.startswith("metaflow/MoaiPipelineFlow/data/") for k in keys)
        assert max(sizes) > 100_000  # the tar bundles (shards, models) are there, not only small artifacts
        assert not (tmp_path / "metaflow" / ".metaflow" / "MoaiPipelineFlow" / "data").exists()
    finally:
        server.stop()


@pytest.mark.slow
def test_a_preempted_pretrain_step_is_retried_and_resumes_from_its_checkpoint(tmp_path):
    """Spot preemption: SIGTERM to the pretrain task once it has a checkpoint. The training loop saves one and
    stops, the stage fails, Metaflow's @retry runs the task again in the same step root, and training resumes
    from the checkpoint instead of starting over."""
    import signal

    work, params, _ = _launch_dir(tmp_path, {"int4": METHODS["int4"]})
    params["pretrain"].update(max_steps=120, save_every=4)
    params["tracking"] = {"enabled": False}
    params["resources"]["pretrain"] = {"retries": 1}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    env = _env(tmp_path)
    flow = subprocess.Popen([sys.executable, str(FLOW), "--no-pylint", "run", "--max-workers", "2"], cwd=work,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, sent = time.monotonic() + 900, False
        while not sent and time.monotonic() < deadline and flow.poll() is None:
            if list((tmp_path / "steps").glob("moai-flow/*/*/pretrain-*/outputs/checkpoints/pretrain/checkpoints/"
                                                "step-*")):
                for proc in Path("/proc").iterdir():  # the pretrain task: `moai_flow.py ... step pretrain ...`
                    try:
                        cmd = (proc / "cmdline").read_bytes().split(b"\0")
                    except OSError:
                        continue
                    if str(FLOW).encode() in cmd and b"step" in cmd and b"pretrain" in cmd:
                        os.kill(int(proc.name), signal.SIGTERM)
                        sent = True
            time.sleep(0.2)
        out, _ = flow.communicate(timeout=1800)
    finally:
        if flow.poll() is None:
            flow.kill()
    assert sent, "the pretrain task never wrote a checkpoint"
    assert flow.returncode == 0, out[-5000:]

    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        from metaflow import Flow, metadata, namespace

        namespace(None)
        metadata(f"local@{tmp_path / 'metaflow'}")
        run = Flow("MoaiPipelineFlow").latest_run
        assert run.successful
        task = run["pretrain"].task
        assert task.current_attempt == 1  # the second attempt finished the step
        metrics = run["pretrain_join"].task.data.metrics
        assert metrics["completed"] and metrics["step"] == 120 and metrics["resumed_from_step"] >= 4


if __name__ == "__main__":
    _run_flow(Path(sys.argv[1]))
