"""Export in the compressed-tensors format (neuralmagic/vLLM `compressed-tensors`, what llm-compressor writes and
vLLM loads natively), written from the format's spec; tests decompress it with the `compressed-tensors` package.

config.json's `quantization_config`:

    {"quant_method": "compressed-tensors", "format": "pack-quantized" | "float-quantized" | "mixed-precision",
     "quantization_status": "compressed", "version": "0.20.1",
     "config_groups": {"group_0": {"targets": ["Linear"], "format": ..., "weights": {QuantizationArgs},
                                   "input_activations": null | {QuantizationArgs}, "output_activations": null}},
     "ignore": [the nn.Linear layers the Mamba policy keeps in high precision: dt_proj, lm_head]}

A single scheme targets the class "Linear" (minus `ignore`); several schemes (layers quantized differently)
each target their layers by name.

Per quantized layer `prefix` (compressed-tensors stores *signed* integers: q_s = q − 2^(b−1), z_s = z − 2^(b−1),
and packs q_s + 2^(b−1), i.e. exactly our unsigned q, so (q_s − z_s)·s = (q − z)·s):

- INT4/INT8 group-wise or per-channel (RTN, QAT, GPTQ, AWQ with folded scales) → "pack-quantized", W4A16/W8A16:
    prefix.weight_packed      int32 (out, in·b/32): q[o, j] at bits b·(j mod 32/b) of word [o, j // (32/b)]
    prefix.weight_scale       (out, in/g) in the model dtype ((out, 1) per channel: strategy "channel")
    prefix.weight_zero_point  int32 (out·b/32, in/g): z[o, k] packed the same way along dim 0 (asymmetric only;
                              symmetric layers have z = 2^(b−1), i.e. z_s = 0, and store none)
    prefix.weight_shape       int64 [out, in]
- FP8 E4M3 per-row weights with dynamic per-token FP8 activations → "float-quantized", W8A8:
    prefix.weight             float8_e4m3fn (out, in)
    prefix.weight_scale       fp32 (out, 1)

Not expressible, refused with a `QuantizationError` naming the fix: AWQ layers whose 1/s is applied to the input
at run time (x_proj, out_proj, fc2: the format has no input scale), GPTQ act-order layers with a permuted g_idx
(compressed-tensors removed act-order "group"), FP4 and bitsandbytes layers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from . import primitives as P
from .api import QuantizationError, quantized_modules
from .export import _kept, _write
from .fp8 import Float8Linear
from .linear import QuantizedLinear

CT_FORMAT_VERSION = "0.20.1"  # the compressed-tensors release this writer follows and is tested against
CT_FORMATS = ("pack-quantized", "float-quantized")


def _fail(fqn: str, problem: str, fix: str) -> None:
    raise QuantizationError(f"compressed-tensors export: {fqn} {problem}; {fix}")


def _int_args(module: QuantizedLinear) -> dict:
    group = module.group_size != -1
    return {"num_bits": module.bits, "type": "int", "symmetric": module.symmetric,
            "strategy": "group" if group else "channel", "group_size": module.group_size if group else None,
            "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}}


def _fp8_args(strategy: str, dynamic: bool) -> dict:
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "group_size": None,
            "block_structure": None, "dynamic": dynamic, "actorder": None,
            "observer": None if dynamic else "minmax", "observer_kwargs": {}}


def layer_scheme(fqn: str, module: nn.Module) -> dict:
    """The compressed-tensors scheme (without targets) of one quantized layer, or a `QuantizationError` saying
    why the format cannot express it and what would."""
    if isinstance(module, QuantizedLinear):
        if module.input_scale is not None:
            _fail(fqn, "is an AWQ layer whose scales are applied to its input at run time, which the format cannot "
                  "store", "quantize only in_proj/fc1 with AWQ (their scales fold into the norms: "
                  "filter_fn=layer_filter('in_proj', 'fc1')) and the rest with RTN/GPTQ, or use export_awq")
        if module.g_idx is not None:
            _fail(fqn, "is GPTQ act-order with a permuted g_idx, which compressed-tensors no longer expresses "
                  "(act-order 'group' was removed)", "quantize with GPTQConfig(act_order=True, static_groups=True), "
                  "or use export_gptq (GPTQ v1 keeps g_idx)")
        if module.out_features % (32 // module.bits) and not module.symmetric:
            _fail(fqn, f"has {module.out_features} outputs, not a multiple of {32 // module.bits} as packed zero "
                  "points need", "quantize it with symmetric=True or leave it out of filter_fn")
        return {"format": "pack-quantized", "weights": _int_args(module), "input_activations": None,
                "output_activations": None}
    if isinstance(module, Float8Linear):
        return {"format": "float-quantized", "weights": _fp8_args("channel", dynamic=False),
                "input_activations": _fp8_args("token", dynamic=True), "output_activations": None}
    _fail(fqn, f"is a {type(module).__name__}, which has no compressed-tensors layout here",
          "export INT4/INT8 (RTN, QAT, GPTQ, AWQ) or FP8 models, or save this one with save_pretrained (moai format)")
    raise AssertionError  # unreachable: _fail raises


def pack_compressed(module: nn.Module) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one layer (see the module docstring); bias under its own name."""
    if isinstance(module, QuantizedLinear):
        out = {"weight_packed": P.pack_int32(module.integers(), module.bits, dim=1),
               "weight_scale": module.scales.detach().clone(),
               "weight_shape": torch.tensor([module.out_features, module.in_features], dtype=torch.int64)}
        if not module.symmetric:
            out["weight_zero_point"] = P.pack_int32(module.zeros, module.bits, dim=0)
    else:
        out = {"weight": module.weight_fp8().clone(), "weight_scale": module.weight_scale.detach().float().clone()}
    if module.bias is not None:
        out["bias"] = module.bias.detach().clone()
    return out


def compressed_tensors_config(model: nn.Module) -> tuple[dict, dict[str, nn.Module]]:
    """(`quantization_config` dict, {fqn: quantized module}) for `model`; raises for layers it cannot express."""
    modules = quantized_modules(model)
    if not modules:
        raise QuantizationError("compressed-tensors export: the model has no quantized layers; quantize_ it first")
    groups: dict[str, tuple[dict, list[str]]] = {}
    for fqn, module in modules.items():
        scheme = layer_scheme(fqn, module)
        groups.setdefault(json.dumps(scheme, sort_keys=True), (scheme, []))[1].append(fqn)
    config_groups = {}
    for i, (scheme, names) in enumerate(groups.values()):
        targets = ["Linear"] if len(groups) == 1 else sorted(names)
        config_groups[f"group_{i}"] = {"targets": targets, **scheme}
    formats = {scheme["format"] for scheme, _ in groups.values()}
    qconfig = {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else
               "mixed-precision", "quantization_status": "compressed", "config_groups": config_groups,
               "ignore": _kept(model), "kv_cache_scheme": None, "global_compression_ratio": None,
               "version": CT_FORMAT_VERSION}
    return qconfig, modules


def export_compressed_tensors(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write `model` as model.safetensors + config.json in the compressed-tensors format."""
    qconfig, modules = compressed_tensors_config(model)
    packed = {fqn: pack_compressed(m) for fqn, m in modules.items()}
    return _write(model, path, packed, qconfig)


def dequantize_compressed(tensors: dict[str, torch.Tensor], scheme: dict) -> torch.Tensor:
    """Ŵ (out, in) of one layer's compressed-tensors tensors (names local to the layer) under `scheme` (a
    config group), decoded from the spec: the export's self-check (the tests use the compressed-tensors package)."""
    weights = scheme["weights"]
    if scheme["format"] == "float-quantized":
        return tensors["weight"].float() * tensors["weight_scale"].float()
    if scheme["format"] != "pack-quantized":
        raise QuantizationError(f"compressed-tensors: format {scheme['format']!r} is not one this library writes "
                                f"({', '.join(CT_FORMATS)})")
    bits, scale = weights["num_bits"], tensors["weight_scale"]
    q = P.unpack_int32(tensors["weight_packed"], bits, dim=1)
    if "weight_zero_point" in tensors:
        z = P.unpack_int32(tensors["weight_zero_point"], bits, dim=0)
    else:
        z = torch.full(scale.shape, 1 << (bits - 1), dtype=torch.int32)
    group = q.shape[1] // scale.shape[1]
    w = (q.float() - z.float().repeat_interleave(group, dim=1)) * scale.float().repeat_interleave(group, dim=1)
    return w.to(scale.dtype)
