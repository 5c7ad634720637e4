"""Quantization of MoaiMamba models: one verb (`quantize_`), a config per method, shared math in `primitives`.

    quantize_(model, IntWeightOnlyConfig(bits=4, group_size=128))       # RTN INT4/INT8
    quantize_(model, GPTQConfig(...)); model(calib_batch) ...; quantize_(model, GPTQConfig(..., step="convert"))
    quantize_(model, QATConfig(...)); train ...; quantize_(model, QATConfig(..., step="convert"))

Methods: RTN INT4/INT8 (`linear.py`), QAT (`qat.py`), GPTQ (`gptq.py`), AWQ (`awq.py`), FP8 E4M3 (`fp8.py`),
FP4 E2M1 MXFP4/NVFP4 (`fp4.py`), bitsandbytes NF4/FP4/INT8 and QLoRA (`bnb.py`). GPTQ v1 / AWQ GEMM exports
in `export.py`, the compressed-tensors export (vLLM, llm-compressor) in `compressed_tensors.py`. Importing this
package registers the "moai" quantization method with transformers, so `from_pretrained` rebuilds quantized
checkpoints (`serialization.py`), bitsandbytes layers included.
"""

from . import _quiet_imports  # noqa: F401  (first: silences torchao import noise, see the module)
from .api import (
    DEFAULT_QUANTIZED_LAYERS,
    QuantConfig,
    QuantizationError,
    SteppedQuantConfig,
    default_filter,
    layer_filter,
    quantize_,
    quantized_modules,
    register_module_kind,
    register_quant_method,
    storage_summary,
)
from .awq import AWQConfig, quantize_awq
from .bnb import BnbConfig, merge_qlora, prepare_qlora
from .compressed_tensors import dequantize_compressed, export_compressed_tensors
from .export import export_awq, export_gptq, pack_awq, pack_gptq, unpack_awq, unpack_gptq
from .fp4 import FP4Config, FP4Linear
from .fp8 import Float8Config, Float8Linear, enable_fp8_training, quantize_fp8
from .gptq import GPTQConfig, gptq_quantize_weight, quantize_gptq
from .linear import IntWeightOnlyConfig, QuantizedLinear, quantize_model
from .qat import FakeQuantLinear, QATConfig
from .serialization import MoaiQuantizationConfig, load_quantized

__all__ = [
    "AWQConfig",
    "BnbConfig",
    "DEFAULT_QUANTIZED_LAYERS",
    "FP4Config",
    "FP4Linear",
    "FakeQuantLinear",
    "Float8Config",
    "Float8Linear",
    "GPTQConfig",
    "IntWeightOnlyConfig",
    "MoaiQuantizationConfig",
    "QATConfig",
    "QuantConfig",
    "QuantizationError",
    "QuantizedLinear",
    "SteppedQuantConfig",
    "default_filter",
    "enable_fp8_training",
    "dequantize_compressed",
    "export_awq",
    "export_compressed_tensors",
    "export_gptq",
    "gptq_quantize_weight",
    "layer_filter",
    "load_quantized",
    "merge_qlora",
    "pack_awq",
    "pack_gptq",
    "prepare_qlora",
    "quantize_",
    "quantize_awq",
    "quantize_fp8",
    "quantize_gptq",
    "quantize_model",
    "quantized_modules",
    "register_module_kind",
    "register_quant_method",
    "storage_summary",
    "unpack_awq",
    "unpack_gptq",
]
