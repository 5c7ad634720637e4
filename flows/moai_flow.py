"""The MOAI pipeline as a Metaflow flow: the same stages as `dvc.yaml`, each step a thin call of
`moai_lib.pipeline.stages.run_stage`.

    start → tokenize → pretrain (@parallel: nodes) → pretrain_join → qat → quantize (foreach method) → join
          → evaluate_variants
          → evaluate (foreach variant) → report → export → promote → end

Run it from the repository root (relative paths in the params file resolve against the current directory):

    METAFLOW_USER=$USER python flows/moai_flow.py --no-pylint run
    python flows/moai_flow.py --no-pylint --config pipeline params/tiny.yaml run      # another params file
    python flows/moai_flow.py --no-pylint run --overrides "pretrain.max_steps=50;qat.train.max_steps=10"
    python flows/moai_flow.py --no-pylint --with kubernetes run                     # every step on the cluster

Params. The Config `pipeline` is the DVC params file (default `params.yaml`), parsed once at launch and
stored with the run, so remote steps see the same values. Its optional `resources:` section sets Metaflow's
`@resources` per step (`resources.pretrain.gpu`, `.memory`, `.cpu`, `.disk`) and the `@retry` count of the
quantize and evaluate branches and of pretrain and qat (`resources.<step>.retries`, default 1); DVC ignores it.
A retried pretrain/qat task reuses its step root, so training continues from its last checkpoint (a preempted
spot GPU loses at most `save_every` steps); on Kubernetes/Batch a retry is a new machine, so point
$MOAI_FLOW_WORKDIR at a persistent volume for that (and `paths.checkpoints` at storage every node shares when
`nodes` > 1).
`resources.pretrain.nodes` (default 1) and `.processes` (per node; default: its GPUs, else 1) make pretraining
distributed: the pretrain step runs on `nodes` machines (`@parallel`; gangs on Kubernetes and AWS Batch
multi-node jobs) and each starts `torchrun --nnodes N --node_rank i --nproc_per_node P` of the same stage (DDP or
FSDP2 per `pretrain.distributed`); rank 0 on node 0 writes the model, its MLflow run is the step's. With one
node and one process the stage runs in the step's own process. Resuming a multi-node run after a failure needs
`paths.checkpoints` on storage every node shares (the train loop refuses ranks that see different checkpoints).
`--overrides` takes
"a.b=value" items separated by ";" (as `moai stage -S`); they change the stages, not `@resources`.

Data between steps. Every step works in its own fresh directory (the step root, under $MOAI_FLOW_WORKDIR or
the system temp dir) holding a `params.yaml` written from the Config and links to the launch directory's
entries (except the output directories), so relative inputs resolve as in a DVC run. The upstream outputs it
needs are unpacked there from artifacts, the stage runs, and everything the stage wrote (its outputs and
`metrics/*.json`, not training checkpoints) is packed into a tar artifact for the next steps. Artifacts live
in Metaflow's datastore (local, or S3 with METAFLOW_DEFAULT_DATASTORE=s3), so steps may run on different
machines. The metrics of each stage are artifacts as well: `metrics` on its task, and `results` (all stages),
`failed_methods`, `champion` on the run (the `end` step).

Failures. A quantize method that fails (after its retries) is caught (`@catch`): the join reports it in
`failed_methods`, and the run goes on without that variant; likewise a quantized variant whose evaluation
fails. A failing tokenize, pretrain, qat or baseline evaluation fails the run.

Remote runs ship `moai_lib` and the local inputs named by the params file (corpus, tokenizer directory,
model config file, export.sources) inside the code package (`@package_sources`); the image needs the
project's requirements (see the repository's Dockerfile). Each bundle is held in memory while it is stored or
loaded: size the steps' memory for the largest model.

S3: with METAFLOW_DEFAULT_DATASTORE=s3 a launch first checks the bucket of METAFLOW_DATASTORE_SYSROOT_S3
(`moai_lib.pipeline.storage`), and every stage checks an s3:// MLflow artifact root before its work.

MLflow: the start step resolves the tracking URI once (tracking.tracking_uri, else $MLFLOW_TRACKING_URI where
start runs, else the sqlite store `mlruns.db` in the launch directory) and every step logs there; remote
steps need a tracking server they can reach.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml
from metaflow import (
    Config,
    FlowSpec,
    Parameter,
    catch,
    config_expr,
    current,
    package_sources,
    parallel,
    resources,
    retry,
    step,
)

# Metaflow's local runtime starts the worker tasks of a @parallel step with `python` from PATH: make that the
# interpreter running this flow (a virtual environment that was not activated would otherwise be skipped).
if os.path.dirname(sys.executable) not in os.environ.get("PATH", "").split(os.pathsep)[:1]:
    os.environ["PATH"] = os.pathsep.join(filter(None, [os.path.dirname(sys.executable), os.environ.get("PATH")]))

BASE_VARIANTS = ("bf16", "qat")  # the variants that are not quantize methods (moai_lib.pipeline.params)
RESOURCE_DEFAULTS = {"cpu": 1, "memory": 4096, "gpu": None, "disk": None,  # Metaflow's @resources defaults
                     "retries": 1,  # @retry of pretrain, qat, quantize and evaluate (0: fail at once)
                     "nodes": 1, "processes": None}  # pretrain: machines, and torchrun processes per machine
# The first components of the default output paths (moai_lib.pipeline.params.DEFAULT_PATHS) and of `paths:` are
# never linked from the launch directory into a step root: a stage must not write through a link into it.
DEFAULT_OUTPUT_TOPS = ("outputs", "metrics", "reports")
WORKDIR_ENV = "MOAI_FLOW_WORKDIR"


# Config helpers (evaluated by Metaflow at launch, through config_expr) ---------------------------------------
def _resource(cfg, step_name: str, key: str):
    """resources.<step>.<key> of the params file, else Metaflow's default."""
    section = (cfg.get("resources") or {}).get(step_name) or {}
    return section.get(key, RESOURCE_DEFAULTS[key])


def _processes_per_node(cfg) -> int:
    """resources.pretrain.processes, else one per GPU of resources.pretrain.gpu, else 1."""
    procs = _resource(cfg, "pretrain", "processes") or _resource(cfg, "pretrain", "gpu") or 1
    return int(procs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _input_paths(cfg) -> list[str]:
    """The local inputs the params file names (relative to the launch directory): corpus files, directories or
    globs, the tokenizer directory, a model config file."""
    tok = cfg.get("tokenize") or {}
    items = []
    for key in ("corpus", "valid_corpus"):
        value = tok.get(key)
        items += [value] if isinstance(value, str) else list(value or [])
    if isinstance(tok.get("tokenizer"), str):
        items.append(tok["tokenizer"])
    preset = (cfg.get("model") or {}).get("preset")
    if isinstance(preset, str) and os.path.isfile(preset):
        items.append(preset)
    # export.sources defaults to the sample corpus' SOURCES.md (moai_lib.pipeline.export.ExportParams)
    sources = (cfg.get("export") or {}).get("sources", "data/sample/SOURCES.md")
    if isinstance(sources, str) and os.path.isfile(sources):
        items.append(sources)
    return items


def _shipped_inputs(cfg) -> list[tuple[str, str]]:
    """(absolute file, path in the code package) for every existing relative input file: remote steps find
    them at the same relative path, since they run in the unpacked package."""
    files = []
    for item in _input_paths(cfg):
        if os.path.isabs(item):
            continue  # must exist on the remote machine itself (image, volume)
        for match in glob.glob(item, recursive=True):
            found = [match] if os.path.isfile(match) else \
                [str(p) for p in Path(match).rglob("*") if p.is_file() and not p.name.startswith(".")]
            files += [(os.path.abspath(f), os.path.normpath(f)) for f in found]
    # a path above the launch directory has no place in the package: it must exist remotely as it is
    return sorted({(f, arc) for f, arc in files if not arc.startswith("..")})


def _shipped_suffixes(cfg) -> list[str]:
    return sorted({Path(arc).suffix or ".py" for _, arc in _shipped_inputs(cfg)}) or [".py"]


# Moving stage outputs between steps ----------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def _pack(root: Path, before: dict, exclude: list[Path]) -> bytes:
    """A tar of every file under root that is new or changed since `before`, except under `exclude`."""
    skip = [os.path.relpath(p, root) + os.sep for p in exclude]
    changed = sorted(rel for rel, sig in _snapshot(root).items()
                     if before.get(rel) != sig and not any(rel.startswith(s) for s in skip))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in changed:
            tar.add(root / rel, arcname=rel, recursive=False)
    return buf.getvalue()


def _unpack(blob: bytes, root: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(root, filter="data")


def _error_text(err) -> str:
    """A @catch'ed exception as one line: "Type: message"."""
    kind = getattr(err, "type", None) or type(err).__name__
    message = " ".join(str(getattr(err, "exception", err)).split())
    return f"{kind}: {message}"


def _read_member(blob: bytes, basename: str) -> str | None:
    """The text of the first file called `basename` in a bundle."""
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        member = next((m for m in tar.getmembers() if m.isfile() and Path(m.name).name == basename), None)
        return tar.extractfile(member).read().decode("utf-8") if member else None


# The flow ------------------------------------------------------------------------------------------------------
@package_sources(config_expr("_shipped_inputs(pipeline)"), suffixes=config_expr("_shipped_suffixes(pipeline)"))
@package_sources("../moai_lib", suffixes=[".py", ".cpp", ".h", ".cu"])  # .cpp: the fused CPU scan, built on use
class MoaiPipelineFlow(FlowSpec):
    """tokenize → pretrain → qat → quantize (per method) → evaluate (per variant) → report → export → promote."""

    pipeline = Config("pipeline", default="params.yaml", parser="yaml.safe_load",
                      help="the params file (DVC's params.yaml or a profile under params/)")
    overrides = Parameter("overrides", default="", separator=";",
                          help='"key=value" overrides of the params file, separated by ";"')

    # -- helpers: everything a step does besides its one run_stage call -----------------------------------
    @staticmethod
    def _run_dir() -> Path:
        """The step roots of this run on this machine."""
        base = Path(os.environ.get(WORKDIR_ENV) or tempfile.gettempdir())
        return base / "moai-flow" / current.flow_name / current.run_id

    def _root(self) -> Path:
        """This task's step root; kept across retries of the task (training resumes from its checkpoints) and
        removed when the step succeeds (the `end` step removes those of failed, caught branches)."""
        root = self._run_dir() / f"{current.step_name}-{current.task_id}"
        root.mkdir(parents=True, exist_ok=True)
        return root

    def _params(self, root: Path):
        """PipelineParams of this run rooted at `root`: the Config with the overrides applied, the run's tracking
        URI, and without the methods that failed upstream. The launch directory's inputs (corpus, SOURCES.md,
        ...) appear in the root through symlinks, so relative input paths mean what they mean in a DVC run."""
        from moai_lib.pipeline.params import PipelineParams, apply_overrides

        overrides = self.overrides if isinstance(self.overrides, list) else [self.overrides]  # "" when not given
        data = apply_overrides(self.pipeline.to_dict(), [o for o in overrides if o.strip()])
        data.pop("resources", None)
        if getattr(self, "tracking_uri", None):
            data.setdefault("tracking", {})["tracking_uri"] = self.tracking_uri
        failed = getattr(self, "failed_methods", {})
        methods = (data.get("quantize") or {}).get("methods") or {}
        if failed and methods:
            data["quantize"]["methods"] = {m: spec for m, spec in methods.items() if m not in failed}
        outputs = {*DEFAULT_OUTPUT_TOPS, *(Path(p).parts[0] for p in (data.get("paths") or {}).values())}
        for entry in Path.cwd().iterdir():
            link = root / entry.name
            if entry.name.startswith(".") or entry.name in outputs or entry.name == "params.yaml" or \
                    os.path.lexists(link):
                continue
            link.symlink_to(entry.resolve())
        (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return PipelineParams.load(root / "params.yaml")

    def _pipeline_id(self) -> str:
        """The MLflow parent run of this Metaflow run (`moai.pipeline_id`)."""
        return f"metaflow:{current.flow_name}/{current.run_id}"

    def _run(self, name: str, inputs=(), launch=None, **which) -> tuple[dict, bytes]:
        """Unpack `inputs` into a fresh step root, run the stage there, and pack what it wrote: (metrics, bundle).
        `launch(root, params)`, when given, runs the stage's work in other processes (torchrun)."""
        from moai_lib.pipeline.stages import run_stage

        root = self._root()
        for blob in inputs:
            _unpack(blob, root)
        params = self._params(root)
        before = _snapshot(root)
        execute = (lambda: launch(root, params)) if launch else None
        metrics = run_stage(name, params, **which, pipeline_id=self._pipeline_id(), execute=execute,
                            tags={"metaflow_run_id": current.run_id, "moai.metaflow_pathspec": current.pathspec,
                                  "moai.git_commit": self.git_commit})
        bundle = _pack(root, before, exclude=[root / params.paths["checkpoints"]])
        shutil.rmtree(root, ignore_errors=True)
        return metrics, bundle

    def _torchrun(self, name: str, root: Path, params, nodes: int, procs: int) -> dict | None:
        """`moai stage NAME` under torchrun on this node (rank 0's MLflow logging is the step's, so it is off
        there); on node 0 the metrics rank 0 wrote."""
        import moai_lib

        node = current.parallel.node_index
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node_rank={node}",
               f"--nproc_per_node={procs}", f"--master_addr={current.parallel.main_ip}",
               f"--master_port={self.master_port}", "-m", "moai_lib.cli", "stage", name,
               "--params", str(root / "params.yaml"), "-S", "tracking.enabled=false"]
        package = str(Path(moai_lib.__file__).resolve().parents[1])  # the code package on a remote machine
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package, os.environ.get("PYTHONPATH")]))}
        print(f"{name} on node {node} of {nodes}: {' '.join(cmd[2:])}", flush=True)
        done = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(done.stdout[-4000:], flush=True)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun of the {name} stage failed on node {node} (exit {done.returncode}): "
                               f"{done.stdout.strip().splitlines()[-1] if done.stdout.strip() else 'no output'}")
        if node != 0:
            return None
        return json.loads(params.path("metrics", name=name).read_text(encoding="utf-8"))

    def _model_bundle(self, variant: str) -> bytes:
        return {"bf16": self.pretrain_bundle, "qat": self.qat_bundle}.get(variant) or self.quantized_bundles[variant]

    # -- steps ---------------------------------------------------------------------------------------------------
    @step
    def start(self):
        """Validate the params (before any heavy work) and fix the run-wide settings."""
        from moai_lib.pipeline.tracking import git_commit

        self.git_commit = git_commit(os.getcwd())[0]
        self.tracking_uri = None
        self.master_port = int(os.environ.get("MOAI_MASTER_PORT") or _free_port())  # torchrun of the pretrain step
        root = self._root()
        params = self._params(root)
        if params.tracking.enabled:
            self.tracking_uri = params.tracking.resolve_uri(os.getcwd())[0]
        self.methods = list(params.quantize.methods)
        self.branches = self.methods or [None]  # a foreach needs one item: None is a branch that does nothing
        self.failed_methods = {}
        self.results = {}
        shutil.rmtree(root, ignore_errors=True)
        self.next(self.tokenize)

    @step
    def tokenize(self):
        """Corpus → tokenizer → packed train/valid shards."""
        self.metrics, self.data_bundle = self._run("tokenize")
        self.results = {**self.results, "tokenize": self.metrics}
        self.next(self.pretrain, num_parallel=int(_resource(self.pipeline, "pretrain", "nodes")))

    @resources(cpu=config_expr("_resource(pipeline, 'pretrain', 'cpu')"),
               memory=config_expr("_resource(pipeline, 'pretrain', 'memory')"),
               gpu=config_expr("_resource(pipeline, 'pretrain', 'gpu')"),
               disk=config_expr("_resource(pipeline, 'pretrain', 'disk')"))
    @retry(times=config_expr("_resource(pipeline, 'pretrain', 'retries')"), minutes_between_retries=0)
    @parallel
    @step
    def pretrain(self):
        """Train the model on the shards (GPUs from resources.pretrain): in this process, or torchrun over
        resources.pretrain.nodes machines × .processes each; node 0 keeps the model."""
        nodes, procs = current.parallel.num_nodes, _processes_per_node(self.pipeline)
        launch = (lambda root, params: self._torchrun("pretrain", root, params, nodes, procs)) \
            if nodes * procs > 1 else None
        self.metrics = self.pretrain_bundle = None
        if current.parallel.node_index == 0:
            self.metrics, self.pretrain_bundle = self._run("pretrain", [self.data_bundle], launch=launch)
        else:  # a worker node: its ranks train, node 0's rank 0 writes the model
            root = self._root()
            _unpack(self.data_bundle, root)
            self._torchrun("pretrain", root, self._params(root), nodes, procs)
            shutil.rmtree(root, ignore_errors=True)
        self.next(self.pretrain_join)

    @step
    def pretrain_join(self, inputs):
        """The model of node 0 (`@parallel` steps end in a join)."""
        main = next(i for i in inputs if i.pretrain_bundle is not None)
        self.merge_artifacts(inputs, exclude=["metrics", "pretrain_bundle", "results"])
        self.metrics, self.pretrain_bundle = main.metrics, main.pretrain_bundle
        self.results = {**main.results, "pretrain": main.metrics}
        self.next(self.qat)

    @resources(cpu=config_expr("_resource(pipeline, 'qat', 'cpu')"),
               memory=config_expr("_resource(pipeline, 'qat', 'memory')"),
               gpu=config_expr("_resource(pipeline, 'qat', 'gpu')"),
               disk=config_expr("_resource(pipeline, 'qat', 'disk')"))
    @retry(times=config_expr("_resource(pipeline, 'qat', 'retries')"), minutes_between_retries=0)
    @step
    def qat(self):
        """Quantization-aware training from the pretrained model, then conversion to packed INT4."""
        self.metrics, self.qat_bundle = self._run("qat", [self.data_bundle, self.pretrain_bundle])
        self.results = {**self.results, "qat": self.metrics}
        self.next(self.quantize, foreach="branches")

    @resources(cpu=config_expr("_resource(pipeline, 'quantize', 'cpu')"),
               memory=config_expr("_resource(pipeline, 'quantize', 'memory')"),
               gpu=config_expr("_resource(pipeline, 'quantize', 'gpu')"),
               disk=config_expr("_resource(pipeline, 'quantize', 'disk')"))
    @catch(var="quantize_error")
    @retry(times=config_expr("_resource(pipeline, 'quantize', 'retries')"), minutes_between_retries=0)
    @step
    def quantize(self):
        """One quantization method of the pretrained model; a failure is caught and reported by the join."""
        self.method, self.metrics, self.bundle = self.input, None, None
        if self.method is not None:
            self.metrics, self.bundle = self._run("quantize", [self.data_bundle, self.pretrain_bundle],
                                                  method=self.method)
        self.next(self.join)

    @step
    def join(self, inputs):
        """Collect the quantized models; report and drop the methods that failed."""
        done = [i for i in inputs if i.method is not None and not i.quantize_error]
        self.quantized_bundles = {i.method: i.bundle for i in done}
        failed = {i.method: _error_text(i.quantize_error) for i in inputs if i.quantize_error}
        self.results = {**inputs[0].results, **{f"quantize_{i.method}": i.metrics for i in done}}
        self.failed_methods = {**inputs[0].failed_methods, **failed}
        self.merge_artifacts(inputs, exclude=["method", "metrics", "bundle", "quantize_error"])
        for method, error in failed.items():
            print(f"quantize@{method} FAILED and is left out of the run: {error}")
        self.variants = [v for v in (*BASE_VARIANTS, *self.methods) if v not in self.failed_methods]
        self.next(self.evaluate_variants)

    @step
    def evaluate_variants(self):
        """Fan out one evaluate branch per variant (Metaflow needs a step between a join and a split)."""
        self.next(self.evaluate, foreach="variants")

    @resources(cpu=config_expr("_resource(pipeline, 'evaluate', 'cpu')"),
               memory=config_expr("_resource(pipeline, 'evaluate', 'memory')"),
               gpu=config_expr("_resource(pipeline, 'evaluate', 'gpu')"),
               disk=config_expr("_resource(pipeline, 'evaluate', 'disk')"))
    @catch(var="evaluate_error")
    @retry(times=config_expr("_resource(pipeline, 'evaluate', 'retries')"), minutes_between_retries=0)
    @step
    def evaluate(self):
        """Perplexity, size and speed of one variant."""
        self.variant = self.input
        self.metrics, self.bundle = self._run("evaluate", [self.data_bundle, self._model_bundle(self.variant)],
                                              variant=self.variant)
        self.next(self.report)

    @step
    def report(self, inputs):
        """The comparison table and plots of every variant that was evaluated."""
        failed = {i.variant: _error_text(i.evaluate_error) for i in inputs if i.evaluate_error}
        baseline = sorted(set(failed) & set(BASE_VARIANTS))
        if baseline:
            raise RuntimeError(f"evaluate@{baseline[0]} failed, so there is no baseline to compare with: "
                               f"{failed[baseline[0]]}")
        for variant, error in failed.items():
            print(f"evaluate@{variant} FAILED and is left out of the run: {error}")
        self.eval_bundles = {i.variant: i.bundle for i in inputs if not i.evaluate_error}
        self.evaluations = {i.variant: i.metrics for i in inputs if not i.evaluate_error}
        self.variants = [v for v in inputs[0].variants if v in self.eval_bundles]
        self.failed_methods = {**inputs[0].failed_methods, **failed}
        self.results = {**inputs[0].results, **{f"evaluate_{v}": m for v, m in self.evaluations.items()}}
        self.merge_artifacts(inputs, exclude=["variant", "metrics", "bundle", "evaluate_error"])
        self.metrics, self.report_bundle = self._run("report", list(self.eval_bundles.values()))
        self.results = {**self.results, "report": self.metrics}
        self.next(self.export)

    @step
    def export(self):
        """HF directories with model cards, one per variant (one step: it is file work, not compute)."""
        models = [self.pretrain_bundle, self.qat_bundle, *self.quantized_bundles.values()]
        self.metrics, self.export_bundle = self._run("export", [self.data_bundle, *models,
                                                                *self.eval_bundles.values()])
        self.results = {**self.results, "export": self.metrics}
        self.next(self.promote)

    @step
    def promote(self):
        """Register the exports in the MLflow model registry and set the `champion` alias (not cached, unlike
        a DVC stage: registering is idempotent)."""
        from moai_lib.pipeline.registry import register_and_promote
        from moai_lib.pipeline.tracking import PIPELINE_ID_ENV

        os.environ[PIPELINE_ID_ENV] = self._pipeline_id()  # register under the run's MLflow parent
        root = self._root()
        for blob in (self.export_bundle, self.report_bundle, *self.eval_bundles.values()):
            _unpack(blob, root)
        self.metrics = self.promotion = register_and_promote(self._params(root))
        self.champion = self.promotion.get("champion")
        shutil.rmtree(root, ignore_errors=True)
        self.next(self.end)

    @step
    def end(self):
        """Print the comparison table, the failed methods and the champion."""
        table = _read_member(self.report_bundle, "comparison.md")
        if table:
            print(table)
        if self.failed_methods:
            print("failed (left out): " + "; ".join(f"{k}: {v}" for k, v in self.failed_methods.items()))
        print(f"champion: {self.champion}")
        shutil.rmtree(self._run_dir(), ignore_errors=True)


def _check_storage(argv: list[str]) -> None:
    """At launch (`run`, `resume`), before Metaflow writes its first artifact: an S3 datastore that cannot be used
    (no credentials, no bucket, access denied, endpoint down) stops here with one line naming the fix, instead of
    failing after Metaflow's S3 retries. The steps' processes (`step`) and other commands skip it."""
    from metaflow import metaflow_config

    if not {"run", "resume"} & set(argv):
        return
    if metaflow_config.DEFAULT_DATASTORE != "s3" and "s3" not in argv and "--datastore=s3" not in argv:
        return  # a local datastore: no need to import moai_lib (torch, seconds) here
    from moai_lib.pipeline.storage import StorageError, check_metaflow_datastore

    try:
        check_metaflow_datastore(argv)
    except StorageError as exc:
        print(f"moai flow: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _check_storage(sys.argv[1:])
    MoaiPipelineFlow()
