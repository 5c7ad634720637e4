"""Export of integer-quantized models in the packed layouts other runtimes read: GPTQ v1 and AWQ GEMM.

GPTQ v1 (AutoGPTQ `checkpoint_format="gptq"`), per quantized linear `prefix`, with b bits and w = 32 / b values
per int32 word:
    prefix.qweight  int32 (in/w, out):   q[o, j] at bits b·(j % w) of word [j // w, o]
    prefix.qzeros   int32 (in/g, out/w): (z[o, k] − 1) mod 2^b at bits b·(o % w) of word [k, o // w]
    prefix.scales   fp16  (in/g, out)
    prefix.g_idx    int32 (in,):         the group of input column j: j // g for contiguous groups; for GPTQ
                                         act-order without static groups, its position in the act-order
                                         permutation // g (qweight rows stay in the original column order)
`checkpoint_format="gptq_v2"` (GPTQModel) stores z itself instead of z − 1 (v1 cannot store z = 0).

AWQ GEMM (AutoAWQ `version="gemm"`, 4-bit), with the 8 columns of each word interleaved as AWQ_PACK_ORDER:
    prefix.qweight  int32 (in, out/8):   q[o, j] for o = 8c + AWQ_PACK_ORDER[i] at bits 4·i of word [j, c]
    prefix.qzeros   int32 (in/g, out/8): z[o, k] in the same order (no − 1)
    prefix.scales   fp16  (in/g, out)
    prefix.input_scale fp16 (in,)        only for layers whose AWQ 1/s is applied at run time (x_proj,
                                         out_proj, fc2): their input is multiplied by it before the matmul.

`export_gptq(model, path)` / `export_awq(model, path)` write `model.safetensors` (the other weights as they are)
and `config.json` with the format's `quantization_config`. The moai format (`save_pretrained`) is the one that
loads back into this library; these exports are for interchange.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import primitives as P
from .api import QuantizationError, quantized_modules
from .linear import QuantizedLinear

GPTQ_FORMATS = ("gptq", "gptq_v2")


def pack_gptq(module: QuantizedLinear, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """GPTQ tensors of one layer (see the module docstring)."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise QuantizationError(f"gptq export: checkpoint_format must be one of {GPTQ_FORMATS}, "
                                f"got {checkpoint_format!r}")
    q, z, bits = module.integers(), module.zeros.to(torch.int64), module.bits
    if checkpoint_format == "gptq":
        if bool((z == 0).any()):
            raise QuantizationError("gptq export: a zero point is 0, which GPTQ v1 (stores z − 1) cannot represent; "
                                    "export with checkpoint_format='gptq_v2' or quantize with symmetric=True")
        z = z - 1
    g = P.resolve_group_size(module.in_features, module.group_size)
    return {
        "qweight": P.pack_int32(q.T, bits, dim=0),
        "qzeros": P.pack_int32(z.T, bits, dim=1),
        "scales": module.scales.T.to(torch.float16).contiguous(),
        "g_idx": (module.g_idx.clone() if module.g_idx is not None
                  else (torch.arange(module.in_features, device=q.device) // g).to(torch.int32)),
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode GPTQ tensors to q (out, in), z (out, in/g), scales (out, in/g) fp16 and g_idx, in our layout."""
    q = P.unpack_int32(tensors["qweight"], bits, dim=0).T
    z = P.unpack_int32(tensors["qzeros"], bits, dim=1).T
    if checkpoint_format == "gptq":
        z = (z + 1) & ((1 << bits) - 1)
    return q.contiguous(), z.contiguous(), tensors["scales"].T.contiguous(), tensors["g_idx"]


def pack_awq(module: QuantizedLinear) -> dict[str, torch.Tensor]:
    """AWQ GEMM tensors of one layer (see the module docstring)."""
    if module.bits != 4:
        raise QuantizationError(f"awq export: the AWQ GEMM format is 4-bit, this layer has {module.bits} bits; "
                                "export it with export_gptq")
    out = {
        "qweight": P.pack_int32(module.integers().T, 4, dim=1, order=P.AWQ_PACK_ORDER),
        "qzeros": P.pack_int32(module.zeros.T, 4, dim=1, order=P.AWQ_PACK_ORDER),
        "scales": module.scales.T.to(torch.float16).contiguous(),
    }
    if module.input_scale is not None:
        out["input_scale"] = module.input_scale.to(torch.float16)
    return out


def unpack_awq(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode AWQ GEMM tensors to q (out, in), z (out, in/g), scales (out, in/g) fp16."""
    q = P.unpack_int32(tensors["qweight"], 4, dim=1, order=P.AWQ_PACK_ORDER).T
    z = P.unpack_int32(tensors["qzeros"], 4, dim=1, order=P.AWQ_PACK_ORDER).T
    return q.contiguous(), z.contiguous(), tensors["scales"].T.contiguous()


def _int_modules(model: nn.Module, fmt: str) -> dict[str, QuantizedLinear]:
    modules = quantized_modules(model)
    if not modules:
        raise QuantizationError(f"{fmt} export: the model has no quantized layers; quantize_ it first")
    others = [fqn for fqn, m in modules.items() if not isinstance(m, QuantizedLinear)]
    if others:
        raise QuantizationError(f"{fmt} export: {others[0]} is a {type(modules[others[0]]).__name__}; only integer "
                                f"group-wise layers (RTN, QAT, GPTQ, AWQ) have a {fmt} layout")
    layouts = {(m.bits, m.group_size, m.symmetric) for m in modules.values()}
    if len(layouts) > 1:
        raise QuantizationError(f"{fmt} export: layers use different (bits, group_size, symmetric) {sorted(layouts)}; "
                                "the format has one setting per checkpoint")
    widths = [fqn for fqn, m in modules.items() if m.out_features % (32 // m.bits)]
    if widths:
        raise QuantizationError(f"{fmt} export: {widths[0]} has {modules[widths[0]].out_features} outputs, not a "
                                f"multiple of {32 // next(iter(modules.values())).bits} as packed zero points need; "
                                "leave it out of filter_fn")
    permuted = [fqn for fqn, m in modules.items() if m.g_idx is not None]
    if fmt == "awq" and permuted:
        raise QuantizationError(f"awq export: {permuted[0]} is GPTQ act-order with a permuted g_idx, which the AWQ "
                                "GEMM format cannot store; use export_gptq, or GPTQConfig(static_groups=True)")
    if fmt == "awq" and any(m.group_size == -1 for m in modules.values()):
        raise QuantizationError("awq export: the AWQ GEMM format needs a group size (32, 64 or 128), the model is "
                                "quantized per channel; use export_gptq or re-quantize with a group size")
    return modules


def _write(model: nn.Module, path: str | os.PathLike, packed: dict[str, dict[str, torch.Tensor]],
           quantization_config: dict) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        prefix = name.rsplit(".", 1)[0]
        if prefix not in packed:
            state[name] = tensor
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding: stored once, as HF does
    for prefix, tensors in packed.items():
        for key, tensor in tensors.items():
            state[f"{prefix}.{key}"] = tensor
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _kept(model: nn.Module) -> list[str]:
    return sorted(fqn for fqn, m in model.named_modules() if type(m) is nn.Linear)


def _method_config(model: nn.Module, method: str) -> dict:
    qc = getattr(model.config, "quantization_config", None)
    for entry in getattr(qc, "methods", []):
        if entry["method"] == method:
            return entry
    return {}


def export_gptq(model: nn.Module, path: str | os.PathLike, checkpoint_format: str = "gptq") -> Path:
    """Write the model in the GPTQ packed format (v1 by default) with its `quantization_config`."""
    modules = _int_modules(model, "gptq")
    if any(m.input_scale is not None for m in modules.values()):
        raise QuantizationError("gptq export: AWQ layers with run-time input scales have no GPTQ layout; use "
                                "export_awq")
    packed = {fqn: pack_gptq(m, checkpoint_format) for fqn, m in modules.items()}
    first = next(iter(modules.values()))
    gptq = _method_config(model, "gptq")
    qconfig = {
        "quant_method": "gptq", "bits": first.bits, "group_size": first.group_size, "sym": first.symmetric,
        "desc_act": bool(gptq.get("act_order", False)), "static_groups": bool(gptq.get("static_groups", False)),
        "damp_percent": gptq.get("damp_percent", 0.01), "true_sequential": True,
        "checkpoint_format": checkpoint_format,
        "modules_in_block_to_quantize": [[fqn.split(".", 3)[3]] for fqn in modules
                                         if fqn.startswith("backbone.layers.0.")],
        "modules_to_not_convert": _kept(model),
    }
    return _write(model, path, packed, qconfig)


def export_awq(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model in the AWQ GEMM packed format with its `quantization_config`."""
    modules = _int_modules(model, "awq")
    packed = {fqn: pack_awq(m) for fqn, m in modules.items()}
    first = next(iter(modules.values()))
    qconfig = {"quant_method": "awq", "bits": 4, "group_size": first.group_size, "zero_point": not first.symmetric,
               "version": "gemm", "modules_to_not_convert": _kept(model),
               "input_scale_modules": sorted(fqn for fqn, m in modules.items() if m.input_scale is not None)}
    return _write(model, path, packed, qconfig)
