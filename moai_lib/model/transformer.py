"""The attention baseline: a small Llama-style Transformer LM, top to bottom in one file.

    input_ids (B, L)
      → model.embed_tokens                                                  (B, L, d)
      → N × DecoderLayer:  h = h + self_attn(input_layernorm(h))            RoPE, causal SDPA, GQA
                           h = h + mlp(post_attention_layernorm(h))          SwiGLU
      → model.norm → lm_head                                                 (B, L, V)

No biases anywhere. Parameter names are those of HF `LlamaForCausalLM` (`model.layers.{i}.self_attn.q_proj`,
`...mlp.gate_proj`, `...input_layernorm`, `model.norm`, `lm_head`), so a state dict loads 1:1 into a
`LlamaForCausalLM` of the same shape (tests/model/test_transformer.py checks logits and greedy generations).
Training and generation interfaces are those of `MoaiMambaForCausalLM` (same forward arguments, same chunked
loss, `cache=` holds HF's `DynamicCache`), so speed, memory and quality comparisons change only the model.

Preset sizes. Each preset keeps the Mamba preset's width d, depth, vocabulary (V = 128,000, padded to a
multiple of 8) and tying, so embeddings are identical; the attention layer is smaller than Mamba's mixer
(≈4d² vs ≈6.3d²), and the SwiGLU width I takes up the difference. Per layer, with H query heads,
K key/value heads of h dims:

    q_proj d·Hh + k_proj d·Kh + v_proj d·Kh + o_proj Hh·d = d·h·(2H + 2K);  SwiGLU 3·d·I;  norms 2d
    I = (Mamba layer − d·h·(2H + 2K) − 2d) / 3d, rounded to 128 (≤ 1b) or 256 (≥ 2b)

  name  d     L   H×h     K   attention/layer  I       layer     Mamba layer   total    Mamba total
  tiny  64    2   4×16    2   12,288           232     57.0K     57.3K         146.8K   147.5K  (−0.5%)
  130m  512   16  8×64    8   1.05M            1920    4.00M     4.06M         129.5M   130.4M  (−0.7%)
  370m  1024  16  16×64   16  4.19M            3584    15.2M     15.3M         374.4M   376.2M  (−0.5%)
  1b    1536  24  24×64   24  9.44M            5248    33.6M     33.8M         1.004B   1.008B  (−0.4%)
  2b    2048  24  16×128  8   12.6M            8448    64.5M     64.2M         2.072B   2.065B  (+0.3%)
  8b    4096  40  32×128  8   41.9M            11264   180.4M    180.8M        8.263B   8.281B  (−0.2%)
  16b   5120  48  40×128  8   62.9M            16384   314.8M    313.8M        16.411B  16.375B (+0.2%)

e.g. 2b: 2048·128·(2·16 + 2·8) = 12.58M; 3·2048·8448 = 51.90M; + 4096 → 64.49M/layer → 1.548B for 24
layers; embeddings 2·128,000·2048 = 524.3M (untied) → 2.072B. Small presets use heads of 64 dims and full
multi-head attention; 2b and up use heads of 128 dims and 8 key/value heads (GQA, as Llama 3), which also
keeps their KV cache 2-5× smaller than multi-head attention would.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..config import ConfigError
from .inputs import check_input_ids
from .loss import lm_head_outputs


class MoaiTransformerConfig(PretrainedConfig):
    """Configuration of the Llama-style attention baseline.

    Args:
        vocab_size: tokenizer vocabulary size; the embedding is padded up to `pad_vocab_size_multiple`.
        hidden_size: model width d.
        intermediate_size: SwiGLU MLP width I.
        num_hidden_layers: number of [attention, MLP] layers.
        num_attention_heads: query heads H.
        num_key_value_heads: key/value heads K (grouped-query attention); must divide H. None = H (MHA).
        head_dim: dims per head h; None = hidden_size / num_attention_heads (which must then divide evenly).
        rope_theta: RoPE base wavelength (10,000 in Llama 2; 500,000 in Llama 3 for long contexts).
        rms_norm_eps: epsilon of every RMSNorm.
        max_position_embeddings: longest context the training/eval code plans for (documents intent; RoPE
            itself has no hard limit).
        tie_word_embeddings: share the embedding matrix with the LM head.
        pad_vocab_size_multiple: pad the vocabulary to this multiple so the LM-head matmul is aligned.
        initializer_range: std of the normal init of every linear and embedding weight (Llama's init).
        use_checkpoint: enable activation (gradient) checkpointing of every layer when the model is built
            (the same switch as `MoaiMambaConfig.use_checkpoint`).
        use_cache: return a `DynamicCache` from forward in eval mode (used by `generate`).
    """

    model_type = "moai_transformer"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 128000,
        hidden_size: int = 768,
        intermediate_size: int = 2048,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5,
        max_position_embeddings: int = 32768,
        tie_word_embeddings: bool = True,
        pad_vocab_size_multiple: int = 8,
        initializer_range: float = 0.02,
        use_checkpoint: bool = False,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.pad_vocab_size_multiple = pad_vocab_size_multiple
        self.initializer_range = initializer_range
        self.use_checkpoint = use_checkpoint
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self.validate_fields()
        if self.head_dim is None:
            self.head_dim = hidden_size // num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return self.vocab_size if m <= 1 else ((self.vocab_size + m - 1) // m) * m

    def validate_fields(self) -> None:
        """Raise `ConfigError` naming the first bad field and what would be valid."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "pad_vocab_size_multiple", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be an integer > 0, got {value!r}")
        H, K, d = self.num_attention_heads, self.num_key_value_heads, self.hidden_size
        if self.head_dim is None:
            if d % H:
                raise ConfigError(f"hidden_size={d} is not divisible by num_attention_heads={H}; choose a head "
                                  "count that divides it or set head_dim explicitly")
        elif isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ConfigError(f"head_dim must be None or an integer > 0, got {self.head_dim!r}")
        h = self.head_dim if self.head_dim is not None else d // H
        if h % 2:
            raise ConfigError(f"head_dim must be even for RoPE (it rotates pairs of dims), got {h}")
        if H % K:
            raise ConfigError(
                f"num_key_value_heads={K} must divide num_attention_heads={H} (each key/value head serves a "
                f"group of H/K query heads); valid values: {[k for k in range(1, H + 1) if H % k == 0]}"
            )
        if not (isinstance(self.rope_theta, float | int) and self.rope_theta > 1):
            raise ConfigError(f"rope_theta must be a number > 1 (e.g. 10000 or 500000), got {self.rope_theta!r}")
        if not (isinstance(self.rms_norm_eps, float | int) and 0 < self.rms_norm_eps < 1):
            raise ConfigError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps!r}")
        if not (isinstance(self.initializer_range, float | int) and self.initializer_range > 0):
            raise ConfigError(f"initializer_range must be > 0, got {self.initializer_range!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name, None)
            for i in value if isinstance(value, list) else [value]:
                if i is not None and not (0 <= i < self.padded_vocab_size):
                    raise ConfigError(f"{name}={value} is outside the vocabulary [0, {self.padded_vocab_size})")


# Presets: same names, widths, depths, vocabulary and tying as the Mamba presets (see the module docstring).
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=232, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=2048, rope_theta=10000.0),
    "130m": dict(vocab_size=128000, hidden_size=512, intermediate_size=1920, num_hidden_layers=16,
                 num_attention_heads=8, tie_word_embeddings=True),
    "370m": dict(vocab_size=128000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=16,
                 num_attention_heads=16, tie_word_embeddings=True),
    "1b": dict(vocab_size=128000, hidden_size=1536, intermediate_size=5248, num_hidden_layers=24,
               num_attention_heads=24, tie_word_embeddings=True),
    "2b": dict(vocab_size=128000, hidden_size=2048, intermediate_size=8448, num_hidden_layers=24,
               num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False),
    "8b": dict(vocab_size=128000, hidden_size=4096, intermediate_size=11264, num_hidden_layers=40,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "16b": dict(vocab_size=128000, hidden_size=5120, intermediate_size=16384, num_hidden_layers=48,
                num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
}


def get_transformer_config(name: str, **overrides: Any) -> MoaiTransformerConfig:
    """Build the named preset (`tiny`, `130m`, `370m`, `1b`, `2b`, `8b`, `16b`), with field overrides."""
    key = str(name).lower()
    if key not in _PRESETS:
        raise ConfigError(f"unknown transformer preset {name!r}; choose one of {', '.join(_PRESETS)}")
    return MoaiTransformerConfig(**{**_PRESETS[key], **overrides})


# Layers ----------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """y = weight · (x / sqrt(mean(x²) + eps)), normalised in fp32. Rounded back to the input dtype *before*
    the weight multiply, as HF Llama does, so bf16 checkpoints give bit-identical outputs in both."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions (B, L) → cos, sin (B, 1, L, h): angle position·θ^(-2i/h) for pair i (RoFormer, eq. 15),
    computed in fp32 and duplicated over both halves (HF's rotate-half layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    freqs = positions[..., None].float() * inv_freq  # (B, L, h/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, L, h)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, L, h): rotate dim pairs (i, i + h/2) by their angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def build_attention_mask(padding_mask: torch.Tensor | None, q_len: int, past: int,
                         device: torch.device) -> torch.Tensor:
    """Boolean SDPA mask (B or 1, 1, Lq, Lk), True = may attend, Lk = past + Lq.

    Query i (absolute index past + i) sees key j when j ≤ past + i and key j is not padding
    (`padding_mask` (B, Lk), 1 = real token). Every query also sees itself, so a left-padding query has
    one key rather than none (some SDPA kernels return NaN for a fully masked row); padded outputs are unused.
    """
    q_idx = torch.arange(past, past + q_len, device=device)[:, None]  # (Lq, 1)
    k_idx = torch.arange(past + q_len, device=device)[None, :]  # (1, Lk)
    mask = (k_idx <= q_idx)[None, None]  # (1, 1, Lq, Lk)
    if padding_mask is not None:
        mask = (mask & padding_mask.bool()[:, None, None, :]) | (k_idx == q_idx)  # (B, 1, Lq, Lk)
    return mask


class Attention(nn.Module):
    """Causal multi-head attention with RoPE and grouped key/value heads, through SDPA."""

    def __init__(self, config: MoaiTransformerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                             config.head_dim)
        d, H, K, h = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(d, H * h, bias=False)
        self.k_proj = nn.Linear(d, K * h, bias=False)
        self.v_proj = nn.Linear(d, K * h, bias=False)
        self.o_proj = nn.Linear(H * h, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: DynamicCache | None) -> torch.Tensor:
        """x (B, L, d) → (B, L, d). `mask` None means plain causal (no padding, no cached prefix) for L > 1."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, h)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, L, h)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, L, h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, K, S, h), S = cached + L
        y = F.scaled_dot_product_attention(  # scale 1/√h; each K head serves H/K query heads
            q, k, v, attn_mask=mask, is_causal=mask is None and L > 1, enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, H, L, h)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class SwiGLU(nn.Module):
    """down_proj(silu(gate_proj(x)) · up_proj(x)) (Shazeer 2020), as LlamaMLP."""

    def __init__(self, config: MoaiTransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: h = h + attn(norm(h)); h = h + mlp(norm(h))."""

    def __init__(self, config: MoaiTransformerConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: DynamicCache | None = None) -> torch.Tensor:
        """hidden_states (B, L, d) → (B, L, d). Positional tensors first: checkpointing replays them."""
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin, mask, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# Models ----------------------------------------------------------------------------------------------------
class MoaiTransformerPreTrainedModel(PreTrainedModel):
    config_class = MoaiTransformerConfig
    config: MoaiTransformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # attention always runs through F.scaled_dot_product_attention

    def _init_weights(self, module: nn.Module) -> None:
        """Llama's init: every linear and embedding weight ~ N(0, initializer_range²), norms at 1."""
        if isinstance(module, nn.Linear | nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)


class MoaiTransformerModel(MoaiTransformerPreTrainedModel):
    """Embedding → decoder layers → final RMSNorm."""

    def __init__(self, config: MoaiTransformerConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """attention_mask (B, cached + L), 1 = real token: covers the cached prefix too, as in HF `generate`.
        Positions count real tokens only, so a left-padded prompt gets the same RoPE angles as unpadded."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            check_input_ids(input_ids, self.embed_tokens.num_embeddings)
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        elif not isinstance(cache, DynamicCache):
            raise TypeError(f"MoaiTransformerForCausalLM supports DynamicCache only, got {type(cache).__name__} "
                            "(leave generate's cache_implementation unset)")
        past = cache.get_seq_length() if cache is not None else 0

        if attention_mask is not None:
            if attention_mask.shape != (batch, past + length):
                raise ValueError(f"attention_mask must have shape (batch, cached + new tokens) = "
                                 f"{(batch, past + length)}, got {tuple(attention_mask.shape)}")
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]  # (B, L)
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: use the causal fast path below
        else:
            positions = torch.arange(past, past + length, device=device).expand(batch, length)  # (B, L)
        # None = plain causal SDPA; an explicit mask only for padding or a multi-token step after a cached prefix.
        mask = None
        if attention_mask is not None or (past > 0 and length > 1):
            mask = build_attention_mask(attention_mask, length, past, device)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)

        hidden_states = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, cos, sin, mask=mask, cache=cache)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        out = BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache,
                                      hidden_states=tuple(all_hidden) if all_hidden is not None else None)
        return out if return_dict is not False else out.to_tuple()


class MoaiTransformerForCausalLM(MoaiTransformerPreTrainedModel, GenerationMixin):
    """Llama-style LM with an LM head, HF `generate` with a `DynamicCache`, and the chunked loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoaiTransformerConfig):
        super().__init__(config)
        self.model = MoaiTransformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.loss_chunk_size = 1024
        self.post_init()
        if config.use_checkpoint:
            self.activation_checkpointing_enable()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Causal LM forward, the contract of `MoaiMambaForCausalLM.forward`.

        labels (B, L): the loss is the shifted next-token cross-entropy (labels are shifted inside), with
        -100 and padded positions (attention_mask == 0) ignored, computed in chunks so the full fp32 logits
        are never materialised. With labels, logits are returned only if `return_logits=True`.
        `logits_to_keep` = k > 0 computes logits for the last k positions only (generation).
        """
        outputs = self.model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache, use_cache=use_cache,
            attention_mask=attention_mask, output_hidden_states=output_hidden_states, return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        mask = attention_mask[:, -hidden_states.shape[1]:] if attention_mask is not None else None
        loss, logits = lm_head_outputs(
            hidden_states, self.lm_head, self.config.vocab_size, labels, mask,
            chunk_size=self.loss_chunk_size, num_items_in_batch=num_items_in_batch,
            logits_to_keep=logits_to_keep, return_logits=return_logits,
        )
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                     hidden_states=outputs.hidden_states)
        return out if return_dict is not False else out.to_tuple()
