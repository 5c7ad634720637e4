"""bitsandbytes NF4 / FP4 (`Linear4bit`) and LLM.int8 (`Linear8bitLt`) layers, and QLoRA on top of NF4.

bitsandbytes ≥ 0.45 runs both layer types on CPU as well as CUDA. Its layers quantize when moved to a
device (`.to(device)`), which the handler does.

Checkpoints: the handler builds `MoaiLinear4bit` / `MoaiLinear8bitLt`, subclasses of bitsandbytes' layers
(defined on first use, since bitsandbytes is optional) that are registered module kinds ("bnb4", "bnb8") like
every other quantized layer, so `save_pretrained` → `load_quantized` goes through `serialization.py` and the
layers come back quantized, computing bit for bit the same outputs. Their state dict is bitsandbytes' own
(packed weight, absmax, quant_map, nested statistics and the packed quant_state for 4-bit; int8 weight, SCB and
weight_format for LLM.int8) with the dots after `weight` replaced by `_` (`weight.absmax` → `weight_absmax`),
because a state-dict name with a dot inside one module cannot be loaded into a module attribute. The layout in
config.json records each of those tensors' original name, shape and dtype; loading fills a `BnbSkeleton` with
plain buffers of that shape and dtype, then `materialize()` rebuilds the bitsandbytes parameters from them
(`Params4bit.from_prequantized`, `Int8Params` with its SCB) without quantizing again.

QLoRA (Dettmers et al. 2023): `prepare_qlora` quantizes the target layers to NF4 and wraps the model with
peft LoRA adapters on them (peft's bnb LoRA layers, chosen because the model carries HF's
`is_loaded_in_4bit` flag); only the adapters train. Afterwards `merge_qlora` merges them into the 4-bit
weights (dequantize, add, re-quantize) or `peft_model.save_pretrained(dir)` saves the adapters alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .api import (
    DEFAULT_QUANTIZED_LAYERS,
    QuantConfig,
    QuantizationError,
    import_optional,
    layer_filter,
    quantize_,
    register_module_kind,
    register_quant_method,
)

BNB_TYPES = ("nf4", "fp4", "int8")
BNB_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class BnbConfig(QuantConfig):
    """bitsandbytes quantization.

    quant_type: "nf4" or "fp4" (`Linear4bit`, block-wise absmax scales of `blocksize` values) or "int8"
    (`Linear8bitLt`, LLM.int8 row-wise). compute_dtype: dtype of the 4-bit matmul. double_quant: quantize the
    4-bit absmax scales too (QLoRA's double quantization). int8_threshold: LLM.int8 outlier threshold
    (0 = no mixed-precision decomposition).
    """

    method = "bnb"
    quant_type: str = "nf4"
    compute_dtype: torch.dtype = torch.float32
    blocksize: int = 64
    double_quant: bool = False
    int8_threshold: float = 0.0

    def __post_init__(self):
        if self.quant_type not in BNB_TYPES:
            self.fail(f"unknown quant_type {self.quant_type!r}", f"choose one of {', '.join(BNB_TYPES)}")
        if self.blocksize not in BNB_BLOCKSIZES:
            self.fail(f"blocksize={self.blocksize} is not supported by bitsandbytes",
                      f"use one of {', '.join(map(str, BNB_BLOCKSIZES))}")


BNB_KINDS = ("bnb4", "bnb8")


def _flat(key: str) -> str:
    """A bitsandbytes state-dict name inside one layer → a module attribute name (`weight.absmax` →
    `weight_absmax`)."""
    return key.replace(".", "_")


class _BnbKind:
    """What the two layer kinds share: the layout, flat state-dict names, and the loading skeleton."""

    def _bnb_state(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """The layer's state dict as bitsandbytes writes it (dotted names), bias included."""
        own: dict = {}
        super()._save_to_state_dict(own, "", keep_vars)
        return own

    def layout(self) -> dict:
        tensors = {_flat(k): {"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                   for k, v in self._bnb_state().items() if k != "bias"}
        return {"kind": self.kind, **self._settings(), "tensors": tensors}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, value in self._bnb_state(keep_vars).items():
            destination[prefix + _flat(key)] = value

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, layout: dict, dtype: torch.dtype,
              device=None) -> BnbSkeleton:
        return BnbSkeleton(in_features, out_features, bias, layout, dtype, device)


@functools.cache
def bnb_module_classes() -> tuple[type, type]:
    """(MoaiLinear4bit, MoaiLinear8bitLt), defined and registered as module kinds on first use."""
    bnb = import_optional("bitsandbytes", "bnb")

    class MoaiLinear4bit(_BnbKind, bnb.nn.Linear4bit):
        """`bnb.nn.Linear4bit` (NF4/FP4) that the moai checkpoint format saves and loads."""

        kind = "bnb4"

        def _settings(self) -> dict:
            return {"quant_type": self.weight.quant_type, "blocksize": self.weight.blocksize,
                    "double_quant": bool(self.weight.compress_statistics),
                    "compute_dtype": str(self.compute_dtype).removeprefix("torch.")}

    class MoaiLinear8bitLt(_BnbKind, bnb.nn.Linear8bitLt):
        """`bnb.nn.Linear8bitLt` (LLM.int8) that the moai checkpoint format saves and loads."""

        kind = "bnb8"

        def _settings(self) -> dict:
            return {"threshold": float(self.state.threshold)}

        def _apply(self, fn, recurse=True):
            """`model.to(device)` reaches this layer through `Module._apply`, which swaps the weight's data in
            place and would leave its int8 matrix (`CB`) and row scales (`SCB`) where they were (bitsandbytes
            moves them only in `Linear8bitLt.to` on the layer itself): rebuild the weight with both on the new
            device, and move the matmul state's copies."""
            weight = self.weight
            if weight is None or weight.dtype != torch.int8:  # not quantized yet: bitsandbytes' own path
                return super()._apply(fn, recurse)
            # Before the first forward the statistics sit on the weight; after it, on the matmul state.
            data = fn(weight.data)  # dtype conversions leave int8 alone; a device move moves it
            on_weight = getattr(weight, "CB", None) is not None
            scb = weight.SCB.to(data.device) if getattr(weight, "SCB", None) is not None else None
            del self._parameters["weight"]
            try:
                super()._apply(fn, recurse)
            finally:
                self.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False,
                                                CB=data if on_weight else None, SCB=scb)
            if self.state.CB is not None:
                self.state.CB = data  # the same int8 matrix, not a second copy
            if self.state.SCB is not None:
                self.state.SCB = self.state.SCB.to(data.device)
            return self

    for cls in (MoaiLinear4bit, MoaiLinear8bitLt):
        cls.__module__ = __name__
        register_module_kind(cls)
    return MoaiLinear4bit, MoaiLinear8bitLt


class BnbSkeleton(nn.Module):
    """A bitsandbytes layer while a checkpoint loads: its tensors as plain buffers of the recorded shapes and
    dtypes (which transformers fills), turned into the real layer by `materialize()` after loading."""

    def __init__(self, in_features: int, out_features: int, bias: bool, layout: dict, dtype: torch.dtype,
                 device=None):
        super().__init__()
        if layout["kind"] not in BNB_KINDS:
            raise QuantizationError(f"checkpoint: {layout['kind']!r} is not a bitsandbytes layer kind")
        self.in_features, self.out_features, self.layout = in_features, out_features, layout
        for name, spec in layout["tensors"].items():
            self.register_buffer(name, torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]),
                                                   device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    def materialize(self) -> nn.Module:
        """The bitsandbytes layer holding exactly the loaded tensors (no re-quantization)."""
        bnb = import_optional("bitsandbytes", self.layout["kind"])
        linear4, linear8 = bnb_module_classes()
        state = {spec["key"]: getattr(self, name) for name, spec in self.layout["tensors"].items()}
        weight = state.pop("weight")
        has_bias = self.bias is not None
        if self.layout["kind"] == "bnb4":
            module = linear4(self.in_features, self.out_features, bias=has_bias,
                             compute_dtype=getattr(torch, self.layout["compute_dtype"]),
                             compress_statistics=self.layout["double_quant"], quant_type=self.layout["quant_type"],
                             device="meta")
            module.weight = bnb.nn.Params4bit.from_prequantized(data=weight, quantized_stats=state,
                                                                requires_grad=False, device=weight.device,
                                                                module=module)
        else:
            module = linear8(self.in_features, self.out_features, bias=has_bias, has_fp16_weights=False,
                             threshold=self.layout["threshold"], device="meta")
            module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight,
                                              SCB=state["SCB"])
        if has_bias:
            module.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
        return module.train(self.training)


def _apply_bnb(model: nn.Module, config: BnbConfig, targets: dict[str, nn.Linear]) -> dict:
    bnb = import_optional("bitsandbytes", f"bnb-{config.quant_type}")
    linear4, linear8 = bnb_module_classes()
    out = {}
    for fqn, linear in targets.items():
        device, weight = linear.weight.device, linear.weight.detach().clone()
        if config.quant_type == "int8":
            module = linear8(linear.in_features, linear.out_features, bias=linear.bias is not None,
                             has_fp16_weights=False, threshold=config.int8_threshold, device="meta")
            module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            module = linear4(linear.in_features, linear.out_features, bias=linear.bias is not None,
                             compute_dtype=config.compute_dtype, compress_statistics=config.double_quant,
                             quant_type=config.quant_type, device="meta")
            module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=config.quant_type,
                                              blocksize=config.blocksize, compress_statistics=config.double_quant)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        out[fqn] = module.to(device)  # bitsandbytes quantizes on the move to a device
    # HF's flags, read by peft to pick its bitsandbytes LoRA layers.
    if config.quant_type == "int8":
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    return out


register_quant_method(BnbConfig, apply=_apply_bnb)


def prepare_qlora(model: nn.Module, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
                  target_layers: tuple[str, ...] = DEFAULT_QUANTIZED_LAYERS, quant_type: str = "nf4",
                  compute_dtype: torch.dtype = torch.float32, double_quant: bool = True):
    """QLoRA: NF4 base layers (`BnbConfig`) + trainable peft LoRA adapters of rank `r` on `target_layers`.

    Returns the `peft.PeftModel`; train it with the usual loop (only adapter parameters require grad).
    """
    peft = import_optional("peft", "qlora")
    quantize_(model, BnbConfig(quant_type=quant_type, compute_dtype=compute_dtype, double_quant=double_quant),
              filter_fn=layer_filter(*target_layers))
    for p in model.parameters():
        p.requires_grad_(False)
    lora = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                           target_modules=list(target_layers), bias="none")
    return peft.get_peft_model(model, lora)


def merge_qlora(peft_model) -> nn.Module:
    """Merge trained LoRA adapters into the 4-bit base layers and return the plain (still 4-bit) model."""
    return peft_model.merge_and_unload()
