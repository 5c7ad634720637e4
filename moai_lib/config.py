"""`MoaiMambaConfig` and the registry of named presets.

Preset sizes (parameter counts from `moai model-info --all-sizes`, checked in tests/test_config.py):

Per layer, with d = hidden_size, E = expand·d = 2d, N = state, R = dt_rank = ceil(d/16), W = conv width,
I = intermediate_size:
    in_proj d·2E = 4d²   x_proj E·(R+2N)   dt_proj R·E + E   conv1d E·W + E   A_log E·N   D E
    out_proj E·d = 2d²   norms 2d          SwiGLU MLP fc1 d·2I + fc2 I·d = 3dI
  ≈ 6d² + 3dI + 4dR + (2N + W + 1 + N + 2 + 1)·2d ... (exact figures from the meta-device count)
plus the embedding V·d and, when untied, the LM head V·d (V = 128,000).

  2b : d=2048, 24 layers. Mixer 26.4M/layer → 634M; embeddings 2·262M = 524M (untied);
       MLP I = 6144 = 3d: 3·2048·6144 = 37.7M/layer → 906M.             Total ≈ 2.06B  (target 2.1B)
  8b : d=4096, 40 layers. Mixer 105.3M/layer → 4.21B; embeddings 2·524M = 1.05B;
       MLP I = 6144 = 1.5d: 3·4096·6144 = 75.5M/layer → 3.02B.          Total ≈ 8.28B  (target 8.2B)
  16b: d=5120, 48 layers. Mixer 164.4M/layer → 7.89B; embeddings 2·655M = 1.31B;
       MLP I = 9728 = 1.9d: 3·5120·9728 = 149.4M/layer → 7.17B.         Total ≈ 16.37B (target 16.4B)

The small presets use the same 128K vocabulary with tied embeddings, so that every preset takes the users'
128K tokenizers unchanged (exact counts: 130m 130.4M, 370m 376.2M, 1b 1.008B, 2b 2.065B, 8b 8.281B,
16b 16.375B):
  130m: d=512,  16 layers, I=1536 (3d)     370m: d=1024, 16 layers, I=2816 (2.75d)
  1b  : d=1536, 24 layers, I=4096 (2.67d)
`tiny` (d=64, 2 layers, vocab 512) is for CPU tests.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from transformers import PretrainedConfig

from .errors import MoaiError
from .kernels.dispatch import BACKENDS


class ConfigError(MoaiError, ValueError):
    """A model configuration is invalid; the message names the field and what would be valid."""


class MoaiMambaConfig(PretrainedConfig):
    """Configuration of a pure-Mamba (Mamba-1) causal LM with an optional SwiGLU MLP in each layer.

    Args:
        vocab_size: tokenizer vocabulary size. The embedding is padded up to a multiple of
            `pad_vocab_size_multiple` (see `padded_vocab_size`) so the LM-head matmul is aligned.
        hidden_size: model width d.
        intermediate_size: SwiGLU MLP width per layer; 0 = no MLP (the layout of HF `MambaForCausalLM`).
        num_hidden_layers: number of [mixer, MLP] layers.
        state_size: SSM state size N per channel (16 in Mamba-1).
        conv_kernel_size: width of the depthwise causal conv before the scan.
        expand_factor: d_inner = expand_factor · hidden_size.
        dt_rank: rank of the Δ projection; "auto" = ceil(hidden_size / 16) as in the Mamba paper.
        rms_norm_eps: epsilon of every RMSNorm.
        max_position_embeddings: longest context the training/eval code plans for. The model has no position
            encoding; this only bounds inputs and documents intent.
        tie_word_embeddings: share the embedding matrix with the LM head.
        pad_vocab_size_multiple: pad the vocabulary to this multiple (8 as in state-spaces/mamba).
        residual_in_fp32: keep the residual stream in fp32 under bf16/fp16 (as state-spaces/mamba).
        use_fast_scan: use the fast scan backend (`kernel_backend`); False forces the sequential reference.
        kernel_backend: "auto", "reference", "cpu", "torch", "triton" or "mamba_ssm" (see `moai_lib.kernels.dispatch`).
        use_checkpoint: enable activation (gradient) checkpointing of every layer when the model is built.
        scan_checkpoint_every: Triton scan only, for long-context training: 0 (default) saves the scan's fp32 state
            every backward chunk (4 steps at N=16: 16 B per channel and step, 8x a bf16 activation); a power of two
            ≥ 64 (e.g. 256) saves it every that many steps and recomputes the rest in the backward (one more scan
            forward; `moai_lib.kernels.triton_scan`). Other backends ignore it.
        use_quantization / quantization_bits: record that the model is meant for quantization-aware training
            at this many bits (4 or 8); the quantization code reads these.
        use_bias / use_conv_bias: biases of the linear projections / of the conv (False / True in Mamba).
        dt_min, dt_max, dt_init_floor, dt_scale, dt_init: Δ initialisation (Mamba paper, appendix; the dt bias
            is the inverse softplus of a log-uniform sample in [dt_min, dt_max]).
        initializer_range: std of the normal init of linear and embedding weights.
        use_cache: return the recurrent cache from forward in eval mode (used by `generate`).
        rescale_prenorm_residual: scale out_proj / fc2 by 1/sqrt(n_residuals_per_layer · n_layers) (GPT-2 scheme).
    """

    model_type = "moai_mamba"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 128000,
        hidden_size: int = 768,
        intermediate_size: int = 0,
        num_hidden_layers: int = 24,
        state_size: int = 16,
        conv_kernel_size: int = 4,
        expand_factor: int = 2,
        dt_rank: int | str = "auto",
        rms_norm_eps: float = 1e-5,
        max_position_embeddings: int = 32768,
        tie_word_embeddings: bool = True,
        pad_vocab_size_multiple: int = 8,
        residual_in_fp32: bool = True,
        use_fast_scan: bool = True,
        kernel_backend: str = "auto",
        use_checkpoint: bool = False,
        scan_checkpoint_every: int = 0,
        use_quantization: bool = False,
        quantization_bits: int = 4,
        use_bias: bool = False,
        use_conv_bias: bool = True,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        dt_init: str = "random",
        initializer_range: float = 0.02,
        rescale_prenorm_residual: bool = True,
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
        self.state_size = state_size
        self.conv_kernel_size = conv_kernel_size
        self.expand_factor = expand_factor
        self.dt_rank = dt_rank
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.pad_vocab_size_multiple = pad_vocab_size_multiple
        self.residual_in_fp32 = residual_in_fp32
        self.use_fast_scan = use_fast_scan
        self.kernel_backend = kernel_backend
        self.use_checkpoint = use_checkpoint
        self.scan_checkpoint_every = scan_checkpoint_every
        self.use_quantization = use_quantization
        self.quantization_bits = quantization_bits
        self.use_bias = use_bias
        self.use_conv_bias = use_conv_bias
        self.dt_min = dt_min
        self.dt_max = dt_max
        self.dt_init_floor = dt_init_floor
        self.dt_scale = dt_scale
        self.dt_init = dt_init
        self.initializer_range = initializer_range
        self.rescale_prenorm_residual = rescale_prenorm_residual
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self.validate_fields()

    # Derived sizes -----------------------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand_factor * self.hidden_size

    @property
    def time_step_rank(self) -> int:
        return math.ceil(self.hidden_size / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return self.vocab_size if m <= 1 else ((self.vocab_size + m - 1) // m) * m

    # Validation -------------------------------------------------------------------------------------------
    def validate_fields(self) -> None:
        """Raise `ConfigError` naming the first bad field and what would be valid."""

        def positive_int(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
            if not ok:
                bound = "≥ 0" if allow_zero else "> 0"
                raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "conv_kernel_size",
                     "expand_factor", "pad_vocab_size_multiple", "max_position_embeddings"):
            positive_int(name)
        positive_int("intermediate_size", allow_zero=True)
        if self.dt_rank != "auto":
            if isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int) or self.dt_rank <= 0:
                raise ConfigError(f"dt_rank must be 'auto' or a positive integer, got {self.dt_rank!r}")
        if self.conv_kernel_size < 2:
            raise ConfigError(
                f"conv_kernel_size must be ≥ 2 (Mamba uses 4), got {self.conv_kernel_size}: a width-1 conv "
                "leaves no decoding cache and breaks the causal-conv kernels"
            )
        if not (isinstance(self.rms_norm_eps, float | int) and 0 < self.rms_norm_eps < 1):
            raise ConfigError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps!r}")
        if not (0 < self.dt_min <= self.dt_max):
            raise ConfigError(f"need 0 < dt_min ≤ dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if self.dt_init not in ("random", "constant"):
            raise ConfigError(f"dt_init must be 'random' or 'constant', got {self.dt_init!r}")
        if self.kernel_backend not in BACKENDS:
            raise ConfigError(f"kernel_backend must be one of {', '.join(BACKENDS)}, got {self.kernel_backend!r}")
        every = self.scan_checkpoint_every
        if (isinstance(every, bool) or not isinstance(every, int) or every < 0 or every & (every - 1)
                or 0 < every < 64):
            raise ConfigError(
                f"scan_checkpoint_every must be 0 (checkpoint every scan chunk, the default) or a power of two "
                f"≥ 64 (e.g. 256, for long-context training), got {every!r}")
        if self.quantization_bits not in (4, 8):
            raise ConfigError(f"quantization_bits must be 4 or 8, got {self.quantization_bits!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name, None)
            ids = value if isinstance(value, list) else [value]
            for i in ids:
                if i is not None and not (0 <= i < self.padded_vocab_size):
                    raise ConfigError(f"{name}={value} is outside the vocabulary [0, {self.padded_vocab_size})")


# Presets ---------------------------------------------------------------------------------------------------
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 tie_word_embeddings=True, max_position_embeddings=2048),
    "130m": dict(vocab_size=128000, hidden_size=512, intermediate_size=1536, num_hidden_layers=16,
                 tie_word_embeddings=True),
    "370m": dict(vocab_size=128000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                 tie_word_embeddings=True),
    "1b": dict(vocab_size=128000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=24,
               tie_word_embeddings=True),
    "2b": dict(vocab_size=128000, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
               tie_word_embeddings=False),
    "8b": dict(vocab_size=128000, hidden_size=4096, intermediate_size=6144, num_hidden_layers=40,
               tie_word_embeddings=False),
    "16b": dict(vocab_size=128000, hidden_size=5120, intermediate_size=9728, num_hidden_layers=48,
                tie_word_embeddings=False),
}

# Advertised sizes; tests assert each preset is within 5% of its name.
PRESET_TARGET_PARAMS = {
    "130m": 130e6, "370m": 370e6, "1b": 1.0e9, "2b": 2.1e9, "8b": 8.2e9, "16b": 16.4e9,
}


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_mamba_config(name: str, **overrides: Any) -> MoaiMambaConfig:
    """Build the named preset (`tiny`, `130m`, `370m`, `1b`, `2b`, `8b`, `16b`), with field overrides."""
    key = str(name).lower()
    if key not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(_PRESETS)} or pass a JSON config path")
    return MoaiMambaConfig(**{**_PRESETS[key], **overrides})


_CONFIG_FIELDS = set(MoaiMambaConfig.__init__.__code__.co_varnames[1:MoaiMambaConfig.__init__.__code__.co_argcount])
# Keys that `PretrainedConfig.to_dict()` writes and that may appear in a saved config.json.
_PASSTHROUGH_KEYS = {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map",
                     "_name_or_path", "output_hidden_states", "return_dict", "name"}


def load_mamba_config(path_or_name: str | os.PathLike, **overrides: Any) -> MoaiMambaConfig:
    """Load a config from a JSON file (our documented format, i.e. `MoaiMambaConfig` field names) or a
    model directory holding `config.json`; a bare preset name is also accepted.

    Raises `ConfigError` with the file name for unreadable JSON, unknown keys, or invalid values.
    """
    path = os.fspath(path_or_name)
    if not os.path.exists(path):
        if path.lower() in _PRESETS:
            return get_mamba_config(path, **overrides)
        raise ConfigError(
            f"config {path!r} is neither a file nor a preset name; presets: {', '.join(_PRESETS)}"
        )
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json in model directory {os.path.dirname(path)!r}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; expected a JSON config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of config fields, got {type(data).__name__}")
    model_type = data.get("model_type", MoaiMambaConfig.model_type)
    if model_type != MoaiMambaConfig.model_type:
        raise ConfigError(
            f"{path}: model_type is {model_type!r}, expected 'moai_mamba'; convert state-spaces/mamba or HF Mamba "
            "checkpoints with `moai_lib.model.convert.load_external_checkpoint`"
        )
    unknown = sorted(set(data) - _CONFIG_FIELDS - _PASSTHROUGH_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown config key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(_CONFIG_FIELDS))}"
        )
    fields = {k: v for k, v in data.items() if k in _CONFIG_FIELDS}
    try:
        return MoaiMambaConfig(**{**fields, **overrides})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
