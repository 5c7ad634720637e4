"""Saving and loading quantized models through HF `save_pretrained` / `from_pretrained`.

config.json carries `quantization_config`:

    {"quant_method": "moai", "format_version": 1,
     "modules": {"backbone.layers.0.mixer.in_proj": {"kind": "int", "bits": 4, "group_size": 32,
                                                     "symmetric": false, "input_scale": false}, ...},
     "methods": [{"method": "gptq", "bits": 4, ..., "modules": [...]}],
     "policy": {"filter": "default", "layer_names": [...], "kept_high_precision": ["...dt_proj", "lm_head"],
                "never_quantized": [...]}}

`modules` is all a loader needs: for each name, the quantized module kind and its layout. The safetensors file
holds each module's buffers under their own names (`...in_proj.qweight`, `.scales`, `.zeros`), so the weights
stay quantized on disk. "moai" is registered with transformers' quantizer registry (`register_quantizer`):
`from_pretrained` builds the float skeleton on the meta device, `MoaiHfQuantizer` swaps the listed `nn.Linear`
modules for empty quantized ones, and transformers fills their buffers from the file.

bitsandbytes layers (kinds "bnb4", "bnb8", see `bnb.py`) load as `BnbSkeleton`s holding bitsandbytes' tensors as
plain buffers; `_process_model_after_weight_loading` turns them into the bitsandbytes layers. A checkpoint whose
`methods` name layers that `modules` does not record (bitsandbytes checkpoints of older versions) is refused
rather than loaded with re-initialised weights.

Importing `moai_lib.quant` performs the registration; `load_quantized(path)` imports and loads in one call.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .api import QuantizationError, module_kind, set_submodule
from .bnb import BNB_KINDS, BnbSkeleton, bnb_module_classes

QUANT_METHOD = "moai"
FORMAT_VERSION = 1


class MoaiQuantizationConfig(QuantizationConfigMixin):
    """The `quantization_config` of a model quantized by `moai_lib.quant` (see the module docstring)."""

    def __init__(self, modules: dict[str, dict] | None = None, methods: list[dict] | None = None,
                 policy: dict[str, Any] | None = None, format_version: int = FORMAT_VERSION,
                 quant_method: str = QUANT_METHOD, **kwargs):
        if quant_method != QUANT_METHOD:
            raise QuantizationError(f"checkpoint: quant_method {quant_method!r} is not {QUANT_METHOD!r}")
        if format_version != FORMAT_VERSION:
            raise QuantizationError(f"checkpoint: quantization format_version {format_version} is not supported "
                                    f"(this moai_lib reads version {FORMAT_VERSION}); upgrade moai_lib")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = dict(modules or {})
        self.methods = list(methods or [])
        self.policy = dict(policy or {})

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy({"quant_method": self.quant_method, "format_version": self.format_version,
                              "modules": self.modules, "methods": self.methods, "policy": self.policy})


def rebuild_quantized_modules(model: nn.Module, qc: MoaiQuantizationConfig) -> None:
    """Swap each `nn.Linear` listed in `qc.modules` for an empty quantized module of the recorded layout."""
    for entry in qc.methods:
        unrecorded = sorted(set(entry.get("modules", [])) - set(qc.modules))
        if unrecorded:  # e.g. bitsandbytes checkpoints written before their layers were stored
            raise QuantizationError(
                f"checkpoint: {entry['method']} quantized {unrecorded[0]}, but the checkpoint records no stored layout "
                "for it (written by an older moai_lib that did not store these layers); re-quantize the "
                "high-precision model and save it again"
            )
    if any(layout["kind"] in BNB_KINDS for layout in qc.modules.values()):
        bnb_module_classes()  # registers the bitsandbytes kinds (bitsandbytes is optional)
    for fqn, layout in qc.modules.items():
        try:
            linear = model.get_submodule(fqn)
        except AttributeError:
            raise QuantizationError(f"checkpoint: quantized module {fqn} does not exist in this model") from None
        if not isinstance(linear, nn.Linear):
            raise QuantizationError(f"checkpoint: {fqn} is a {type(linear).__name__}, expected nn.Linear")
        cls = module_kind(layout["kind"])
        set_submodule(model, fqn, cls.empty(linear.in_features, linear.out_features, linear.bias is not None,
                                            layout, dtype=linear.weight.dtype, device=linear.weight.device))


def materialize_skeletons(model: nn.Module) -> None:
    """Turn the loaded bitsandbytes skeletons into bitsandbytes layers (see `bnb.py`)."""
    kinds = set()
    for fqn, module in list(model.named_modules()):
        if isinstance(module, BnbSkeleton):
            set_submodule(model, fqn, module.materialize())
            kinds.add(module.layout["kind"])
    # HF's flags, read by peft to pick its bitsandbytes LoRA layers (as `BnbConfig` sets them).
    if "bnb4" in kinds:
        model.is_loaded_in_4bit = True
    if "bnb8" in kinds:
        model.is_loaded_in_8bit = True


class MoaiHfQuantizer(HfQuantizer):
    """Loads checkpoints written by `save_pretrained` after `quantize_` (pre-quantized only)."""

    requires_calibration = True  # quantizing a float checkpoint while loading is not offered: use quantize_

    def _process_model_before_weight_loading(self, model, **kwargs):
        rebuild_quantized_modules(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        materialize_skeletons(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(MoaiQuantizationConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(MoaiHfQuantizer)


def load_quantized(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load a quantized MoaiMamba checkpoint (`from_pretrained` with the moai quantizer registered).

    Raises `QuantizationError` when the checkpoint holds no moai quantization_config.
    """
    config = AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if method != QUANT_METHOD:
        raise QuantizationError(
            f"load_quantized: {os.fspath(path)} has no moai quantization_config (found {method!r}); load float "
            "checkpoints with from_pretrained and quantize them with quantize_"
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval()
