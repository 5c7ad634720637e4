"""bitsandbytes NF4 / FP4 (`Linear4bit`) and LLM.int8 (`Linear8bitLt`) layers, and QLoRA on top of NF4.

bitsandbytes ≥ 0.45 runs both layer types on CPU as well as CUDA. Its layers quantize when moved to a
device (`.to(device)`), which the handler does. Their storage is bitsandbytes' own (quant_state objects), so a
model with bnb layers is not saved in the moai checkpoint format: loading such a checkpoint raises and says
to re-apply `BnbConfig` to the high-precision model.

QLoRA (Dettmers et al. 2023): `prepare_qlora` quantizes the target layers to NF4 and wraps the model with
peft LoRA adapters on them (peft's bnb LoRA layers, chosen because the model carries HF's
`is_loaded_in_4bit` flag); only the adapters train. Afterwards `merge_qlora` merges them into the 4-bit
weights (dequantize, add, re-quantize) or `peft_model.save_pretrained(dir)` saves the adapters alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .api import (
    DEFAULT_QUANTIZED_LAYERS,
    QuantConfig,
    import_optional,
    layer_filter,
    quantize_,
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


def _apply_bnb(model: nn.Module, config: BnbConfig, targets: dict[str, nn.Linear]) -> dict:
    bnb = import_optional("bitsandbytes", f"bnb-{config.quant_type}")
    out = {}
    for fqn, linear in targets.items():
        device, weight = linear.weight.device, linear.weight.detach().clone()
        if config.quant_type == "int8":
            module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                         has_fp16_weights=False, threshold=config.int8_threshold, device="meta")
            module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
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
