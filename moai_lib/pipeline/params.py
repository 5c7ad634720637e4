"""`PipelineParams`: the one parser of params.yaml, validated across stages before any heavy work.

    params = PipelineParams.load("params.yaml", overrides=["quantize.methods.gptq.group_size=64"])
    params.pretrain            # TrainParams
    params.quantize.config("gptq")   # GPTQConfig(step="prepare", ...)
    params.path("model", variant="int4")   # <root>/outputs/models/quantized/int4

The file has one section per stage (tokenize, model, pretrain, qat, quantize, evaluate, export, tracking,
register) and `paths:` (output directories, relative to the directory holding the params file). Every check
that needs no data runs in `load`: unknown sections and keys, unknown quantization methods, impossible
numbers (e.g. a negative learning rate), a group size that does not divide a quantized layer of the chosen
model, output paths that leave the run directory, a missing or empty corpus. The check that needs the
tokenized data (a batch larger than the training split) is `check_data`, run by the training stages before
the model is built. Every error is a `PipelineError` whose message starts with the param's dotted name.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import PipelineError

# `resources` ({step: {cpu, memory, gpu, disk, retries}}) is read only by the Metaflow flow's @resources/@retry
# (flows/moai_flow.py); the stages ignore it.
SECTIONS = ("tokenize", "model", "pretrain", "qat", "quantize", "evaluate", "export", "tracking", "register",
            "paths", "resources")
RESOURCE_KEYS = ("cpu", "memory", "gpu", "disk", "retries")
BASE_VARIANTS = ("bf16", "qat")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # usable as a DVC stage suffix and a directory name

# Output directories under the run root; `paths:` may move any of them (inside the root).
DEFAULT_PATHS = {
    "data": "outputs/data",
    "models": "outputs/models",
    "checkpoints": "outputs/checkpoints",
    "eval": "outputs/eval",
    "exports": "outputs/exports",
    "metrics": "metrics",
    "reports": "reports",
}
# Logical outputs → templates over DEFAULT_PATHS' keys (what `PipelineParams.path` resolves).
_PATH_TEMPLATES = {
    "data": "{data}",
    "pretrain_model": "{models}/pretrain",
    "qat_model": "{models}/qat",
    "quantized_model": "{models}/quantized/{method}",
    "checkpoints": "{checkpoints}/{stage}",
    "eval": "{eval}/{variant}.json",
    "eval_dir": "{eval}",
    "export": "{exports}/{variant}",
    "metrics": "{metrics}/{name}.json",
    "reports": "{reports}",
}


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: `1e-3` is a number (PyYAML's YAML 1.1 wants `1.0e-3` and reads `1e-3` as a string), as
    DVC (ruamel) reads the same file."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _fail(param: str, problem: str, fix: str = "") -> PipelineError:
    return PipelineError(f"{param}: {problem}" + (f"; {fix}" if fix else ""))


def _rename(exc: Exception, section: str) -> PipelineError:
    """A library error ("batch_size must be ...") as a PipelineError naming the section's param."""
    text = " ".join(str(exc).split())
    m = re.match(r"^([a-z_][a-z0-9_]*)( must| should| is |:)", text)
    if m:
        return PipelineError(f"{section}.{m.group(1)}:{text[len(m.group(1)):].removeprefix(':')}")
    m = re.match(r"^unknown [a-z ]*parameter\(s\) ([a-z0-9_, ]+);", text)
    if m:
        return PipelineError(f"{section}.{m.group(1).split(',')[0].strip()}: {text}")
    return PipelineError(f"{section}: {text}")


# Overrides ---------------------------------------------------------------------------------------------------
def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply "a.b.c=value" overrides (value parsed as YAML: 1e-3 → float, [a, b] → list) to a copy of data."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise PipelineError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. "
                                "pretrain.learning_rate=1e-3")
        try:
            value = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise PipelineError(f"override {key}: value {raw!r} is not valid YAML ({exc})") from None
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise PipelineError(f"override {key}: {'.'.join(parts[:depth + 1])} is a "
                                    f"{type(child).__name__}, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _as_section(data: dict, name: str) -> dict:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(name, f"expected a mapping of settings, got {type(value).__name__}")
    return dict(value)


# Model -------------------------------------------------------------------------------------------------------
@dataclass
class ModelParams:
    """The model to pretrain.

    Args:
        preset: a preset of `moai_lib.config` (tiny, 130m, ..., 16b) or a JSON config file (relative to root).
        overrides: MoaiMambaConfig fields set on top of the preset (e.g. hidden_size, num_hidden_layers).
        vocab_size: "auto" = the tokenizer's size (the trained BPE's or the loaded tokenizer's), or a number.
    """

    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)
    vocab_size: int | str = "auto"

    def build_config(self, root: Path, vocab_size: int | None = None):
        """The `MoaiMambaConfig` (vocab_size: the tokenizer's size when `self.vocab_size` is "auto")."""
        import inspect

        from ..config import ConfigError, MoaiMambaConfig, get_mamba_config, load_mamba_config, preset_names

        if not isinstance(self.preset, str) or not self.preset:
            raise _fail("model.preset", f"expected a preset name or a JSON config path, got {self.preset!r}")
        valid = [n for n in inspect.signature(MoaiMambaConfig.__init__).parameters if n not in ("self", "kwargs")]
        unknown = sorted(set(self.overrides) - set(valid))
        if unknown:  # PretrainedConfig would keep a misspelt field silently
            raise _fail(f"model.overrides.{unknown[0]}", "not a MoaiMambaConfig field", f"valid: {', '.join(valid)}")
        overrides = dict(self.overrides)
        if self.vocab_size != "auto":
            overrides["vocab_size"] = self.vocab_size
        elif vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        try:
            if self.preset.lower() in preset_names():
                return get_mamba_config(self.preset, **overrides)
            path = root / self.preset
            if not path.exists():
                raise _fail("model.preset", f"{self.preset!r} is neither a preset nor a file",
                            f"use one of {', '.join(preset_names())} or a JSON config path")
            return load_mamba_config(path, **overrides)
        except TypeError as exc:
            raise _fail("model.overrides", str(exc), "use MoaiMambaConfig field names") from None
        except ConfigError as exc:
            raise _rename(exc, "model.overrides") from None


# QAT ---------------------------------------------------------------------------------------------------------
@dataclass
class QatParams:
    """Quantization-aware training from the pretrained model, then conversion to real packed integers.

    Args:
        bits / group_size / symmetric: the fake quantization (= the stored format after convert).
        train: TrainParams fields for the QAT run, on top of the pretrain section's (set a lower
            learning_rate and a short max_steps here).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    train: dict = field(default_factory=dict)

    def config(self, step: str = "prepare"):
        from ..quant import QATConfig

        return QATConfig(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, step=step)


# Quantize ----------------------------------------------------------------------------------------------------
def _method_types() -> dict[str, type]:
    from ..quant import AWQConfig, BnbConfig, Float8Config, FP4Config, GPTQConfig, IntWeightOnlyConfig

    return {"rtn": IntWeightOnlyConfig, "gptq": GPTQConfig, "awq": AWQConfig, "fp8": Float8Config,
            "fp4": FP4Config, "bnb": BnbConfig}


CALIBRATED = ("gptq", "awq")
QUANT_DTYPES = ("float32", "bfloat16", "float16")


def _dtype(value, param: str):
    """A dtype setting of a quantization method, written in params as its name ("bfloat16")."""
    import torch

    if value not in QUANT_DTYPES:
        raise _fail(param, f"expected a dtype name, got {value!r}", f"valid: {', '.join(QUANT_DTYPES)}")
    return getattr(torch, value)


@dataclass
class CalibrationParams:
    """Calibration data of GPTQ/AWQ: `num_samples` sequences of `seq_len` tokens from the train shards."""

    num_samples: int = 32
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0


@dataclass
class QuantizeParams:
    """methods: {name: {method: rtn|gptq|awq|fp8|fp4|bnb, layers: [...], <config fields>}}; one quantize stage
    and one model variant per name. `method` may be left out when the name is a method (e.g. `gptq: {}`).
    A dtype setting (bnb's compute_dtype) is written as its name: `compute_dtype: bfloat16`."""

    methods: dict[str, dict] = field(default_factory=dict)
    calibration: CalibrationParams = field(default_factory=CalibrationParams)

    def method_type(self, name: str) -> str:
        spec = self.methods[name]
        return spec.get("method", name)

    def layers(self, name: str) -> list[str] | None:
        return self.methods[name].get("layers")

    def config(self, name: str):
        """The method's QuantConfig (the "prepare" step for calibrated methods)."""
        if name not in self.methods:
            raise _fail("quantize.methods", f"no method named {name!r}", f"valid: {', '.join(self.methods) or 'none'}")
        spec = {k: v for k, v in self.methods[name].items() if k not in ("method", "layers")}
        cls = _method_types()[self.method_type(name)]
        from ..quant import QuantizationError

        valid = [f.name for f in dataclasses.fields(cls) if f.name != "step"]
        unknown = sorted(set(spec) - set(valid))
        if unknown:
            raise _fail(f"quantize.methods.{name}.{unknown[0]}", f"unknown setting for {self.method_type(name)}",
                        f"valid: method, layers, {', '.join(valid)}")
        import torch

        for f in dataclasses.fields(cls):
            if isinstance(f.default, torch.dtype) and f.name in spec:
                spec[f.name] = _dtype(spec[f.name], f"quantize.methods.{name}.{f.name}")
        try:
            return cls(**spec)
        except QuantizationError as exc:
            text = str(exc)
            bad = next((f for f in valid if f"{f}=" in text or f"{f} " in text), None)
            raise _fail(f"quantize.methods.{name}" + (f".{bad}" if bad else ""), text) from None


# Adapters for the sections owned by the evaluation/export/tracking/registry modules ---------------------------
def _section_params(module: str, cls_name: str, data: dict, section: str):
    """`cls.from_dict(data)` from the module that owns the section (imported here: registry imports mlflow
    lazily, evaluation imports torch, so the parser stays importable on its own)."""
    import importlib

    cls = getattr(importlib.import_module(f"moai_lib.pipeline.{module}"), cls_name)
    try:
        return cls.from_dict(data)
    except PipelineError as exc:  # name the param first, as every other message does
        text = str(exc)
        m = re.search(rf"\b{re.escape(section)}\.[A-Za-z_]\w*", text)
        if m and not text.startswith(m.group(0)):
            raise PipelineError(f"{m.group(0)}: {text}") from None
        raise
    except TypeError as exc:
        valid = ", ".join(f.name for f in dataclasses.fields(cls))
        raise _fail(section, str(exc), f"valid keys: {valid}") from None
    except ValueError as exc:
        raise _rename(exc, section) from None


# The whole file ----------------------------------------------------------------------------------------------
@dataclass
class PipelineParams:
    root: Path
    tokenize: Any          # moai_lib.data.TokenizeParams
    model: ModelParams
    pretrain: Any          # moai_lib.train.TrainParams
    qat: QatParams
    qat_train: Any         # TrainParams of the QAT run (pretrain's, with qat.train on top)
    quantize: QuantizeParams
    evaluate: Any          # EvaluateParams
    export: Any            # ExportParams
    tracking: Any          # TrackingParams
    register: Any          # RegisterParams
    paths: dict[str, str]
    raw: dict              # the parsed file after overrides (section dicts, for logging)
    source: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike = "params.yaml", overrides: Sequence[str] = ()) -> PipelineParams:
        """Read, override and validate a params file; the run root is the file's directory."""
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"params file {os.fspath(path)!r} does not exist" if not path.exists()
                                else f"params file {os.fspath(path)!r} is not a file")
        try:
            data = load_yaml(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise PipelineError(f"{os.fspath(path)}: not valid YAML ({' '.join(str(exc).split())})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise PipelineError(f"{os.fspath(path)}: expected a mapping of sections ({', '.join(SECTIONS)})")
        params = cls.from_dict(apply_overrides(data, overrides), root=path.resolve().parent)
        params.source = path.resolve()
        return params

    @classmethod
    def from_dict(cls, data: dict, root: str | os.PathLike) -> PipelineParams:
        from ..data import DataError, TokenizeParams
        from ..train import TrainConfigError, TrainParams

        root = Path(root).resolve()
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise _fail(unknown[0], "unknown section", f"valid sections: {', '.join(SECTIONS)}")

        # paths first: every other check may name an output
        paths = {**DEFAULT_PATHS}
        for key, value in _as_section(data, "paths").items():
            if key not in DEFAULT_PATHS:
                raise _fail(f"paths.{key}", "unknown path", f"valid: {', '.join(DEFAULT_PATHS)}")
            if not isinstance(value, str) or not value.strip():
                raise _fail(f"paths.{key}", f"expected a relative directory, got {value!r}")
            paths[key] = value
        for key, value in paths.items():
            _inside_root(root, value, f"paths.{key}")

        for step, spec in _as_section(data, "resources").items():
            if not isinstance(spec, dict) or set(spec) - set(RESOURCE_KEYS):
                raise _fail(f"resources.{step}", f"expected a mapping of {', '.join(RESOURCE_KEYS)}, got {spec!r}")

        tok = _as_section(data, "tokenize")
        if "corpus" not in tok:
            raise _fail("tokenize.corpus", "missing", "give the training corpus: files, directories or globs")
        tok["corpus"] = _corpus_paths(root, tok["corpus"], "tokenize.corpus")
        if tok.get("valid_corpus") is not None:
            tok["valid_corpus"] = _corpus_paths(root, tok["valid_corpus"], "tokenize.valid_corpus")
        if isinstance(tok.get("tokenizer"), str):
            tok["tokenizer"] = os.fspath(root / tok["tokenizer"])
        try:
            tokenize = TokenizeParams(**tok)
        except TypeError as exc:
            valid = ", ".join(f.name for f in dataclasses.fields(TokenizeParams))
            raise _fail("tokenize", str(exc), f"valid keys: {valid}") from None
        except DataError as exc:
            raise _rename(exc, "tokenize") from None

        model = _dataclass_section(ModelParams, _as_section(data, "model"), "model")
        if not isinstance(model.overrides, dict):
            raise _fail("model.overrides", "expected a mapping of MoaiMambaConfig fields")
        pre = _as_section(data, "pretrain")
        try:
            pretrain = TrainParams.from_dict(pre)
        except TrainConfigError as exc:
            raise _rename(exc, "pretrain") from None

        qat = _dataclass_section(QatParams, _as_section(data, "qat"), "qat")
        if not isinstance(qat.train, dict):
            raise _fail("qat.train", "expected a mapping of TrainParams fields")
        try:
            qat_train = TrainParams.from_dict({**pre, **qat.train})
        except TrainConfigError as exc:
            raise _rename(exc, "qat.train") from None
        try:
            qat.config()
        except ValueError as exc:
            raise _quant_error(exc, "qat") from None

        q = _as_section(data, "quantize")
        unknown = sorted(set(q) - {"methods", "calibration"})
        if unknown:
            raise _fail(f"quantize.{unknown[0]}", "unknown key", "valid: methods, calibration")
        methods = q.get("methods") or {}
        if not isinstance(methods, dict):
            raise _fail("quantize.methods", "expected a mapping {name: {method: ..., settings}}")
        calibration = _dataclass_section(CalibrationParams, q.get("calibration") or {}, "quantize.calibration")
        for key in ("num_samples", "seq_len", "batch_size"):
            value = getattr(calibration, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _fail(f"quantize.calibration.{key}", f"must be an integer ≥ 1, got {value!r}")
        quantize = QuantizeParams(methods={k: dict(v or {}) for k, v in methods.items()}, calibration=calibration)
        types = _method_types()
        for name, spec in methods.items():
            if not isinstance(name, str) or not _NAME.match(name) or name in BASE_VARIANTS:
                raise _fail(f"quantize.methods.{name}", "invalid name", "use lowercase letters, digits, _ and -, "
                            f"not {' or '.join(BASE_VARIANTS)} (the names of the other variants)")
            if spec is not None and not isinstance(spec, dict):
                raise _fail(f"quantize.methods.{name}", f"expected a mapping of settings, got {spec!r}")
            kind = quantize.method_type(name)
            if kind not in types:
                raise _fail(f"quantize.methods.{name}.method" if "method" in (spec or {}) else
                            f"quantize.methods.{name}", f"unknown quantization method {kind!r}",
                            f"valid methods: {', '.join(types)}")
            layers = quantize.layers(name)
            if layers is not None and (not isinstance(layers, list) or not layers
                                       or not all(isinstance(x, str) for x in layers)):
                raise _fail(f"quantize.methods.{name}.layers", "expected a non-empty list of layer names "
                            "(e.g. [in_proj, x_proj, out_proj, fc1, fc2])")
            quantize.config(name)

        sections = {}
        for name, (module, cls_name) in _OWNED_SECTIONS.items():
            sections[name] = _section_params(module, cls_name, _as_section(data, name), name)

        params = cls(root=root, tokenize=tokenize, model=model, pretrain=pretrain, qat=qat, qat_train=qat_train,
                     quantize=quantize, paths=paths, raw=copy.deepcopy(data), **sections)
        params._check_model()
        params.export.check_quantize(quantize)  # variants the export format cannot express
        return params

    # Cross-stage checks --------------------------------------------------------------------------------------
    def model_config(self, vocab_size: int | None = None):
        """The model config; vocab_size "auto" uses `vocab_size` (the data's), else the tokenizer setting."""
        if vocab_size is None and self.tokenize.vocab_size is not None:
            vocab_size = self.tokenize.vocab_size
        return self.model.build_config(self.root, vocab_size)

    def _check_model(self) -> None:
        """Model config, context length and every quantization config against the model's layers (built on
        the meta device: no memory)."""
        config = self.model_config()
        max_pos = getattr(config, "max_position_embeddings", None)
        for section, tp in (("pretrain", self.pretrain), ("qat.train", self.qat_train)):
            seq = tp.max_length or self.tokenize.block_size
            if max_pos is not None and seq > max_pos:
                raise _fail(f"{section}.max_length" if tp.max_length else "tokenize.block_size",
                            f"{seq} tokens exceed the model's max_position_embeddings {max_pos}",
                            "lower it or raise model.overrides.max_position_embeddings")
            if tp.max_length and self.tokenize.block_size % tp.max_length:
                raise _fail(f"{section}.max_length", f"{tp.max_length} does not divide tokenize.block_size "
                            f"{self.tokenize.block_size}", "use a divisor of the block size")
        linears = _linear_shapes(config)
        from ..quant import DEFAULT_QUANTIZED_LAYERS

        def check(cfg, names, param: str) -> None:
            selected = {fqn: shape for fqn, shape in linears.items() if fqn.rsplit(".", 1)[-1] in names}
            if not selected:
                raise _fail(f"{param}.layers" if param.startswith("quantize") else param,
                            f"selects no linear layer of this model (layers: "
                            f"{', '.join(sorted({f.rsplit('.', 1)[-1] for f in linears}))})")
            import torch

            for fqn, (fan_in, fan_out) in selected.items():
                with torch.device("meta"):
                    linear = torch.nn.Linear(fan_in, fan_out, bias=False)
                try:
                    cfg.check_layer(fqn, linear)
                except ValueError as exc:
                    raise _quant_error(exc, param) from None

        check(self.qat.config(), DEFAULT_QUANTIZED_LAYERS, "qat")
        for name in self.quantize.methods:
            check(self.quantize.config(name), self.quantize.layers(name) or DEFAULT_QUANTIZED_LAYERS,
                  f"quantize.methods.{name}")

    def check_data(self, data_dir: str | os.PathLike | None = None) -> dict:
        """Checks that need the tokenized data (run by the training stages before building the model): each
        training run's batch against the number of training sequences, calibration against the data."""
        from ..data import DataError, PackedDataset, read_index

        data_dir = Path(data_dir) if data_dir is not None else self.path("data")
        try:
            index = read_index(data_dir)
        except (DataError, FileNotFoundError) as exc:
            raise _fail("paths.data", f"no tokenized data in {data_dir} ({exc})", "run the tokenize stage first") \
                from None
        block = int(index.get("block_size", self.tokenize.block_size))
        for section, tp in (("pretrain", self.pretrain), ("qat.train", self.qat_train)):
            seq = tp.max_length or block
            n = len(PackedDataset(data_dir, "train", seq_len=seq))
            need = tp.batch_size * tp.gradient_accumulation_steps
            if need > n:
                raise _fail(f"{section}.batch_size", f"batch_size × gradient_accumulation_steps = {need} sequences "
                            f"per step, but the training data has only {n} sequences of {seq} tokens",
                            f"use batch_size ≤ {max(1, n // tp.gradient_accumulation_steps)} or more data")
        if any(self.quantize.method_type(m) in CALIBRATED for m in self.quantize.methods):
            seq = self.quantize.calibration.seq_len
            if block % seq:
                raise _fail("quantize.calibration.seq_len", f"{seq} does not divide the data's block size {block}",
                            f"use a divisor of {block}")
        return index

    # Views -------------------------------------------------------------------------------------------------
    def path(self, key: str, **fmt) -> Path:
        """A resolved output path: data, pretrain_model, qat_model, quantized_model (method=), checkpoints
        (stage=), eval (variant=), eval_dir, export (variant=), metrics (name=), reports; `model` (variant=)
        maps a variant to its model directory."""
        if key == "model":
            variant = fmt["variant"]
            if variant == "bf16":
                return self.path("pretrain_model")
            if variant == "qat":
                return self.path("qat_model")
            if variant not in self.quantize.methods:
                raise _fail("variant", f"unknown variant {variant!r}", f"valid: {', '.join(self.variants())}")
            return self.path("quantized_model", method=variant)
        if key not in _PATH_TEMPLATES:
            raise KeyError(f"unknown output {key!r}; known: model, {', '.join(_PATH_TEMPLATES)}")
        rel = _PATH_TEMPLATES[key].format(**self.paths, **fmt)
        return _inside_root(self.root, rel, f"paths ({key})")

    def section(self, name: str) -> dict:
        """One section as a plain dict after overrides (what the file says; defaults are not filled in)."""
        if name not in SECTIONS:
            raise KeyError(f"unknown section {name!r}; sections: {', '.join(SECTIONS)}")
        value = self.raw.get(name)
        return copy.deepcopy(value) if isinstance(value, dict) else {}

    def variants(self) -> list[str]:
        return [*BASE_VARIANTS, *self.quantize.methods]

    def variant_method(self, variant: str) -> str:
        """The quantization method of a variant ("none" for bf16)."""
        if variant == "bf16":
            return "none"
        if variant == "qat":
            return "qat"
        return self.quantize.method_type(variant)


_OWNED_SECTIONS = {
    "evaluate": ("evaluation", "EvaluateParams"),
    "export": ("export", "ExportParams"),
    "tracking": ("tracking", "TrackingParams"),
    "register": ("registry", "RegisterParams"),
}


def _dataclass_section(cls, data: dict, section: str):
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise _fail(f"{section}.{unknown[0]}", "unknown key", f"valid: {', '.join(valid)}")
    return cls(**data)


def _quant_error(exc: Exception, param: str) -> PipelineError:
    text = " ".join(str(exc).split())
    for key in ("group_size", "bits", "format", "backend", "block_size"):
        if f"{key}=" in text or f"{key} " in text:
            return PipelineError(f"{param}.{key}: {text}")
    return PipelineError(f"{param}: {text}")


def _inside_root(root: Path, rel: str, param: str) -> Path:
    path = Path(rel)
    resolved = (path if path.is_absolute() else root / path).resolve()
    if resolved != root and root not in resolved.parents:
        raise _fail(param, f"{rel!r} resolves to {resolved}, outside the run directory {root}",
                    "outputs must stay inside the directory of the params file: use a relative path without '..'")
    if resolved == root:
        raise _fail(param, f"{rel!r} is the run directory itself", "use a sub-directory")
    return resolved


def _corpus_paths(root: Path, value, param: str) -> list[str]:
    """Corpus entries resolved against the root (reading outside it is allowed), each checked to exist and be
    non-empty now, before any work."""
    from ..data import DataError, resolve_corpus_files

    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, str) and x.strip() for x in items):
        raise _fail(param, f"expected a file, directory or glob (or a non-empty list of them), got {value!r}")
    remote = next((x for x in items if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", x)), None)
    if remote is not None:  # resolve_corpus_files reads local paths only; DVC versions a copy of remote data
        raise _fail(param, f"{remote!r} is a URL; the tokenize stage reads local files",
                    f"fetch it first (`dvc import-url {remote} data/corpus` keeps it versioned, or `aws s3 sync`) "
                    "and point the param at the local copy")
    resolved = [x if os.path.isabs(x) else os.fspath(root / x) for x in items]
    try:
        files = resolve_corpus_files(resolved)
    except DataError as exc:
        raise _fail(param, str(exc), "point it at existing JSON Lines, text or Parquet files") from None
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise _fail(param, f"corpus file {empty[0]!r} is empty", "give files with text")
    return resolved


def _linear_shapes(config) -> dict[str, tuple[int, int]]:
    """{fqn: (in_features, out_features)} of the linear layers quantization may touch (built on the meta
    device, so a 16B preset costs nothing)."""
    import torch

    from ..model.info import build_meta_model

    model = build_meta_model(config)
    return {fqn: (m.in_features, m.out_features) for fqn, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}
