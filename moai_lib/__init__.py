"""MOAI: train, quantize and ship pure-Mamba language models.

Importing this package registers model_type "moai_mamba" with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import ConfigError, MoaiMambaConfig, get_mamba_config, load_mamba_config, preset_names
from .model import MoaiMambaCache, MoaiMambaForCausalLM, MoaiMambaModel

__version__ = "0.1.0"

AutoConfig.register(MoaiMambaConfig.model_type, MoaiMambaConfig, exist_ok=True)
AutoModel.register(MoaiMambaConfig, MoaiMambaModel, exist_ok=True)
AutoModelForCausalLM.register(MoaiMambaConfig, MoaiMambaForCausalLM, exist_ok=True)

__all__ = [
    "ConfigError",
    "MoaiMambaCache",
    "MoaiMambaConfig",
    "MoaiMambaForCausalLM",
    "MoaiMambaModel",
    "get_mamba_config",
    "load_mamba_config",
    "preset_names",
]
