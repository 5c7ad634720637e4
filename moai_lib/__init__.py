"""MOAI: train, quantize and ship pure-Mamba language models.

Importing this package registers model_type "moai_mamba" with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from . import quant  # noqa: F401  (registers the "moai" quantization method with transformers' from_pretrained)
from .config import ConfigError, MoaiMambaConfig, get_mamba_config, load_mamba_config, preset_names
from .errors import MoaiError
from .model import MoaiMambaCache, MoaiMambaForCausalLM, MoaiMambaModel
from .model.transformer import (
    MoaiTransformerConfig,
    MoaiTransformerForCausalLM,
    MoaiTransformerModel,
    get_transformer_config,
)

__version__ = "0.1.0"

AutoConfig.register(MoaiMambaConfig.model_type, MoaiMambaConfig, exist_ok=True)
AutoModel.register(MoaiMambaConfig, MoaiMambaModel, exist_ok=True)
AutoModelForCausalLM.register(MoaiMambaConfig, MoaiMambaForCausalLM, exist_ok=True)
AutoConfig.register(MoaiTransformerConfig.model_type, MoaiTransformerConfig, exist_ok=True)
AutoModel.register(MoaiTransformerConfig, MoaiTransformerModel, exist_ok=True)
AutoModelForCausalLM.register(MoaiTransformerConfig, MoaiTransformerForCausalLM, exist_ok=True)

__all__ = [
    "ConfigError",
    "MoaiError",
    "MoaiMambaCache",
    "MoaiMambaConfig",
    "MoaiMambaForCausalLM",
    "MoaiMambaModel",
    "MoaiTransformerConfig",
    "MoaiTransformerForCausalLM",
    "MoaiTransformerModel",
    "get_mamba_config",
    "get_transformer_config",
    "load_mamba_config",
    "preset_names",
]
