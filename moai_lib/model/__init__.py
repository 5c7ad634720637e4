"""Models: the Mamba LM (`mamba.py`), its decoding cache, the chunked loss, conversion, and the attention baseline."""

from .cache import MoaiMambaCache
from .mamba import MoaiMambaForCausalLM, MoaiMambaModel, MoaiMambaPreTrainedModel

__all__ = ["MoaiMambaCache", "MoaiMambaForCausalLM", "MoaiMambaModel", "MoaiMambaPreTrainedModel"]
