"""One verb for every method: `quantize_(model, config, filter_fn=None)`, torchao style.

- Each method has a config dataclass; a handler registry keyed by the config's type maps it to the code that
  swaps `nn.Linear` modules for quantized ones (`register_quant_method`).
- Methods that calibrate or train (QAT, GPTQ, AWQ) run in steps with the same verb: the config's
  `step="prepare"` (insert fake-quant modules / start observing) → train or run calibration batches →
  the same config with `step="convert"`. `convert` without `prepare` raises an error naming that step.
- The Mamba-aware default policy (`default_filter`) quantizes `in_proj`, `x_proj`, `out_proj` and the MLP
  (`fc1`, `fc2`); `dt_proj` (input width dt_rank, tiny and precision-critical for Δ), `conv1d`, `A_log`, `D`,
  norms, the embedding and `lm_head` stay in high precision (Quamba, MambaQuant; state-spaces/mamba#133).
  Only `nn.Linear` modules are ever candidates, so `A_log`, `D`, `conv1d` and norms cannot be quantized.
- What was done is recorded in `model.config.quantization_config` (a `MoaiQuantizationConfig`): the layout of
  every quantized module, the method configs and the policy (which linear layers were kept in high
  precision). `save_pretrained` writes it to config.json; `from_pretrained` rebuilds the quantized modules
  from it (see `serialization.py`).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import MoaiError

logger = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]

DEFAULT_QUANTIZED_LAYERS = ("in_proj", "x_proj", "out_proj", "fc1", "fc2")
# Group sizes the integer methods accept (-1 = per output channel). Packed formats and GPU kernels
# (GPTQ/AWQ exports, torch's int4 tinygemm) are built around these.
INT_GROUP_SIZES = (32, 64, 128)
STEPS = ("prepare", "convert")


class QuantizationError(MoaiError, ValueError):
    """A quantization request that cannot be honoured; the message names the method and the fix."""


# Optional packages: pins tested with this code (requirements/test.txt).
OPTIONAL_PACKAGES = {"bitsandbytes": "bitsandbytes==0.50.2", "peft": "peft==0.21.2", "torchao": "torchao==0.18.0"}


def import_optional(package: str, method: str):
    """Import an optional package for `method`, or raise `QuantizationError` saying how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise QuantizationError(f"{method}: needs the optional package {package} ({exc}); install it with "
                                f"`pip install {OPTIONAL_PACKAGES[package]}`") from None


# Filters ---------------------------------------------------------------------------------------------------
def layer_filter(*layer_names: str) -> FilterFn:
    """A filter that selects `nn.Linear` modules whose last name component is one of `layer_names`.

    `layer_filter(*DEFAULT_QUANTIZED_LAYERS, "lm_head")` is the default policy plus the LM head.
    """
    names = frozenset(layer_names)

    def select(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and fqn.rsplit(".", 1)[-1] in names

    select.layer_names = tuple(sorted(names))  # recorded in the checkpoint's policy
    return select


default_filter: FilterFn = layer_filter(*DEFAULT_QUANTIZED_LAYERS)
default_filter.__doc__ = "The Mamba-aware default: in_proj, x_proj, out_proj, fc1, fc2 (nn.Linear only)."


def _describe_filter(filter_fn: FilterFn) -> dict[str, Any]:
    if filter_fn is default_filter:
        return {"filter": "default", "layer_names": list(DEFAULT_QUANTIZED_LAYERS)}
    names = getattr(filter_fn, "layer_names", None)
    return {"filter": getattr(filter_fn, "__qualname__", repr(filter_fn)),
            "layer_names": list(names) if names is not None else None}


# Configs ---------------------------------------------------------------------------------------------------
@dataclass
class QuantConfig:
    """Base of every method's config. Subclasses set `method` (a short name used in messages and metadata)
    and validate their fields in `__post_init__` with `self.fail(...)`."""

    method: ClassVar[str] = "base"

    def fail(self, problem: str, fix: str) -> None:
        raise QuantizationError(f"{self.method}: {problem}; {fix}")

    def check_layer(self, fqn: str, linear: nn.Linear) -> None:
        """Raise `QuantizationError` if this layer cannot be quantized with this config (before any change)."""

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            if f.name == "step":
                continue
            value = getattr(self, f.name)
            out[f.name] = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
        return out


@dataclass
class SteppedQuantConfig(QuantConfig):
    """A method that needs data between two steps. `step` is "prepare" or "convert"; `between_steps` says what
    the user does in between (used in error messages)."""

    between_steps: ClassVar[str] = "run forward passes on calibration batches"
    step: str = "prepare"

    def __post_init__(self):
        if self.step not in STEPS:
            self.fail(f"step must be 'prepare' or 'convert', got {self.step!r}",
                      "run step='prepare', then calibration/training, then step='convert'")


def check_bits(config: QuantConfig, bits: int, allowed: tuple[int, ...]) -> None:
    if bits not in allowed:
        config.fail(f"bits={bits!r} is not supported", f"use bits in {allowed}")


def check_group_size(config: QuantConfig, group_size: int, allowed: tuple[int, ...] = INT_GROUP_SIZES,
                     per_channel: bool = True) -> None:
    valid = (*allowed, -1) if per_channel else allowed
    if group_size not in valid:
        config.fail(f"group_size={group_size!r} is not supported",
                    f"use one of {', '.join(map(str, valid))}" + (" (-1 = per output channel)" if per_channel else ""))


def check_group_divides(config: QuantConfig, fqn: str, in_features: int, group_size: int,
                        allowed: tuple[int, ...] = INT_GROUP_SIZES) -> None:
    """Name the layer and the group sizes that would work when `group_size` does not divide its input width."""
    if group_size == -1 or in_features % group_size == 0:
        return
    fits = [g for g in allowed if in_features % g == 0]
    fix = (f"use group_size={fits[-1]}" + (f" (or {', '.join(map(str, fits[:-1]))})" if len(fits) > 1 else "")
           if fits else f"no group size in {allowed} divides {in_features}")
    config.fail(
        f"layer {fqn} has input width {in_features}, not divisible by group_size={group_size}",
        f"{fix}, or group_size=-1 (per channel), or leave the layer out with filter_fn",
    )


# Registry --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Handler:
    apply: Callable | None = None    # one-shot: (model, config, targets) -> {fqn: new module}
    prepare: Callable | None = None  # stepped: (model, config, targets) -> state object
    convert: Callable | None = None  # stepped: (model, config, state) -> {fqn: new module}


_HANDLERS: dict[type, _Handler] = {}
_MODULE_KINDS: dict[str, type] = {}


def register_quant_method(config_cls: type, *, apply: Callable | None = None, prepare: Callable | None = None,
                          convert: Callable | None = None) -> None:
    """Register the handler of a config type: `apply` for one-shot methods, `prepare` + `convert` for
    stepped ones (`config_cls` must then derive from `SteppedQuantConfig`)."""
    stepped = issubclass(config_cls, SteppedQuantConfig)
    if stepped != (prepare is not None and convert is not None) or stepped == (apply is not None):
        raise TypeError(f"{config_cls.__name__}: pass apply= for one-shot methods, prepare= and convert= for "
                        "SteppedQuantConfig subclasses")
    _HANDLERS[config_cls] = _Handler(apply=apply, prepare=prepare, convert=convert)


def register_module_kind(cls: type) -> type:
    """Register a quantized module class (class attribute `kind`, `layout()`, classmethod
    `empty(in_features, out_features, bias, layout, dtype)`) so that checkpoints can rebuild it."""
    _MODULE_KINDS[cls.kind] = cls
    return cls


def module_kind(kind: str) -> type:
    if kind not in _MODULE_KINDS:
        raise QuantizationError(
            f"checkpoint: unknown quantized module kind {kind!r}; known kinds: {', '.join(sorted(_MODULE_KINDS))}. "
            "Import the module that defines it (moai_lib.quant registers all built-in kinds)"
        )
    return _MODULE_KINDS[kind]


# The verb --------------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    """What `prepare` left on the model for `convert`."""

    config: SteppedQuantConfig
    state: Any
    policy: dict[str, Any]


_PENDING_ATTR = "_moai_quant_pending"


def select_targets(model: nn.Module, config: QuantConfig, filter_fn: FilterFn) -> dict[str, nn.Linear]:
    """The modules `filter_fn` selects, each checked by `config.check_layer` before anything changes."""
    targets = {fqn: m for fqn, m in model.named_modules() if fqn and filter_fn(m, fqn)}
    for fqn, module in targets.items():
        if type(module) is not nn.Linear:
            raise QuantizationError(
                f"{config.method}: filter_fn selected {fqn} ({type(module).__name__}); only nn.Linear layers can be "
                "quantized (already-quantized layers are skipped by the default filter)"
            )
        config.check_layer(fqn, module)
    if not targets:
        raise QuantizationError(f"{config.method}: filter_fn selected no nn.Linear layer; nothing to quantize "
                                "(is the model already quantized?)")
    _check_tied(model, config, targets)
    return targets


def _check_tied(model: nn.Module, config: QuantConfig, targets: dict[str, nn.Linear]) -> None:
    owners: dict[int, list[str]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(fqn)
    for fqn, module in targets.items():
        others = [o for o in owners.get(id(module.weight), []) if o != fqn]
        if others:
            raise QuantizationError(
                f"{config.method}: {fqn} shares its weight with {', '.join(others)} (tied embeddings); quantizing it "
                "would untie them. Keep it out of filter_fn (the default), or build the model with "
                "tie_word_embeddings=False"
            )


def set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None) -> nn.Module:
    """Quantize `model` in place with `config` and return it.

    filter_fn(module, fqn) -> bool chooses the layers (default: `default_filter`). For stepped methods
    (`SteppedQuantConfig`), `step="prepare"` takes filter_fn; `step="convert"` must carry the same settings
    as the prepare step and takes no filter_fn.
    """
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(sorted(c.__name__ for c in _HANDLERS))
        raise QuantizationError(f"no quantization method is registered for {type(config).__name__}; known: {known}")
    pending: _Pending | None = getattr(model, _PENDING_ATTR, None)
    if isinstance(config, SteppedQuantConfig) and config.step == "convert":
        return _convert(model, config, handler, pending, filter_fn)
    if pending is not None:
        raise QuantizationError(
            f"{config.method}: the model is prepared for {pending.config.method} and waits for its convert step "
            f"(quantize_(model, dataclasses.replace(config, step='convert'))); convert it before quantizing again"
        )
    filter_fn = filter_fn or default_filter
    targets = select_targets(model, config, filter_fn)
    policy = _describe_filter(filter_fn)
    if handler.apply is not None:
        new_modules = handler.apply(model, config, targets)
        _install(model, config, new_modules, policy)
    else:
        state = handler.prepare(model, config, targets)
        setattr(model, _PENDING_ATTR, _Pending(config=config, state=state, policy=policy))
        logger.info("%s: prepared %d layers; run calibration/training, then step='convert'", config.method,
                    len(targets))
    return model


def _convert(model, config, handler, pending, filter_fn) -> nn.Module:
    if filter_fn is not None:
        raise QuantizationError(f"{config.method}: filter_fn belongs to the prepare step; convert uses the layers "
                                "chosen there")
    if pending is None:
        raise QuantizationError(
            f"{config.method}: convert called, but the model was never prepared; the missing step is 'prepare': "
            f"quantize_(model, {type(config).__name__}(..., step='prepare')), then {config.between_steps}, then convert"
        )
    if type(pending.config) is not type(config):
        raise QuantizationError(f"{config.method}: the model was prepared for {pending.config.method}, not "
                                f"{config.method}; convert with {type(pending.config).__name__}(..., step='convert')")
    diff = {f.name: (getattr(pending.config, f.name), getattr(config, f.name)) for f in dataclasses.fields(config)
            if f.name != "step" and getattr(pending.config, f.name) != getattr(config, f.name)}
    if diff:
        shown = ", ".join(f"{k}: prepared {a!r}, convert {b!r}" for k, (a, b) in diff.items())
        raise QuantizationError(f"{config.method}: convert settings differ from prepare ({shown}); convert with "
                                "dataclasses.replace(prepare_config, step='convert')")
    new_modules = handler.convert(model, pending.config, pending.state)
    delattr(model, _PENDING_ATTR)
    _install(model, pending.config, new_modules, pending.policy)
    return model


def _install(model: nn.Module, config: QuantConfig, new_modules: dict[str, nn.Module], policy: dict) -> None:
    for fqn, module in new_modules.items():
        # A new module starts in training mode; it takes the mode of the layer it replaces (bitsandbytes'
        # LLM.int8 computes differently in training mode).
        module.train(model.get_submodule(fqn).training)
        set_submodule(model, fqn, module)
    record_quantization(model, config, new_modules, policy)


def record_quantization(model: nn.Module, config: QuantConfig, new_modules: dict[str, nn.Module],
                        policy: dict) -> None:
    """Add the quantized modules' layouts, the config and the policy to `model.config.quantization_config`."""
    from .serialization import MoaiQuantizationConfig  # serialization imports this module

    hf_config = getattr(model, "config", None)
    if hf_config is None:
        return  # a bare nn.Module: nothing to save the metadata into
    qc = getattr(hf_config, "quantization_config", None)
    if not isinstance(qc, MoaiQuantizationConfig):
        qc = MoaiQuantizationConfig()
    layouts = {fqn: m.layout() for fqn, m in new_modules.items() if hasattr(m, "layout")}
    qc.modules.update(layouts)
    kept = sorted(fqn for fqn, m in model.named_modules() if type(m) is nn.Linear)
    qc.methods.append({**config.to_dict(), "modules": sorted(new_modules)})
    qc.policy = {**policy, "kept_high_precision": kept,
                 "never_quantized": ["A_log", "D", "conv1d", "norms", "embedding"]}
    hf_config.quantization_config = qc


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of `model` that are registered quantized kinds, by name."""
    kinds = tuple(_MODULE_KINDS.values())
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, kinds)}


def storage_summary(model: nn.Module) -> dict[str, float]:
    """Storage of the quantized layers recorded in `model.config.quantization_config`.

    Returns quantized_weights (logical weights in those layers), quantized_bytes (everything their state
    dicts hold: packed weights, scales, zero points, run-time scales, bitsandbytes statistics),
    bits_per_weight (8 · quantized_bytes / quantized_weights) and model_bytes (the whole state dict, tied
    tensors counted once).
    """
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    names = sorted({fqn for entry in getattr(qc, "methods", []) for fqn in entry["modules"]})
    if not names:
        raise QuantizationError("storage_summary: the model records no quantized layers; quantize_ it first")
    weights = quantized_bytes = 0
    for fqn in names:
        module = model.get_submodule(fqn)
        weights += module.in_features * module.out_features
        quantized_bytes += sum(t.numel() * t.element_size() for t in module.state_dict().values()
                               if isinstance(t, torch.Tensor))
    seen, model_bytes = set(), 0
    for t in model.state_dict().values():
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            model_bytes += t.numel() * t.element_size()
    return {"quantized_weights": weights, "quantized_bytes": quantized_bytes,
            "bits_per_weight": 8 * quantized_bytes / weights, "model_bytes": model_bytes}
