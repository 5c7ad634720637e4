"""Checkpoint conversion between MoaiMamba and the two external Mamba-1 formats.

- state-spaces/mamba (`mamba_ssm.MambaLMHeadModel`): `config.json` with `d_model`, `n_layer`, `ssm_cfg`, ...
  and `pytorch_model.bin` (a pickle; its own `from_pretrained` reads only that file). Parameter names are
  ours already (STYLE.md), so weights map 1:1.
- HF transformers `MambaForCausalLM` (model_type "mamba"): `model.safetensors` with `backbone.embeddings.`
  instead of our `backbone.embedding.`, and no MLP (HF Mamba has none), so only MLP-free models export.

Formats that cannot be represented (Mamba-2 mixers, attention layers, LayerNorm, other activations) are
refused with a `ConversionError` that names the offending field; missing, unexpected or misshapen weights
are listed. Pickle weight files are read only when the caller opts in with `allow_pickle=True`, and even
then through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError, MoaiMambaConfig, load_mamba_config
from ..errors import MoaiError
from .mamba import MoaiMambaForCausalLM

logger = logging.getLogger(__name__)

HF_EMBEDDING = "backbone.embeddings."
OUR_EMBEDDING = "backbone.embedding."
# mamba-ssm's GatedMLP rounds its hidden width up to this multiple (`GatedMLP(multiple_of=128)`).
MAMBA_SSM_MLP_MULTIPLE = 128
# mamba-ssm's `MambaLMHeadModel` never passes `norm_epsilon` down: every RMSNorm uses the default 1e-5.
MAMBA_SSM_NORM_EPS = 1e-5

_MAMBA_SSM_KEYS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                   "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"}
# `mamba_ssm.modules.mamba_simple.Mamba` arguments → our field names. `use_fast_path` is a kernel choice.
_MAMBA1_SSM_CFG = {"d_state": "state_size", "d_conv": "conv_kernel_size", "expand": "expand_factor",
                   "dt_rank": "dt_rank", "dt_min": "dt_min", "dt_max": "dt_max", "dt_init": "dt_init",
                   "dt_scale": "dt_scale", "dt_init_floor": "dt_init_floor", "conv_bias": "use_conv_bias",
                   "bias": "use_bias"}
_MAMBA1_SSM_IGNORED = {"layer", "use_fast_path"}
# HF `MambaConfig` fields → ours.
_HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers",
              "state_size": "state_size", "conv_kernel": "conv_kernel_size", "expand": "expand_factor",
              "time_step_rank": "dt_rank", "layer_norm_epsilon": "rms_norm_eps", "use_bias": "use_bias",
              "use_conv_bias": "use_conv_bias", "residual_in_fp32": "residual_in_fp32",
              "tie_word_embeddings": "tie_word_embeddings", "time_step_min": "dt_min", "time_step_max": "dt_max",
              "time_step_floor": "dt_init_floor", "time_step_scale": "dt_scale", "time_step_init_scheme": "dt_init",
              "initializer_range": "initializer_range", "rescale_prenorm_residual": "rescale_prenorm_residual",
              "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id"}
# Keys HF Mamba configs carry that do not change the computation (runtime switches, bookkeeping, and the
# mamba-ssm names that early `*-hf` conversions copied along).
_HF_IGNORED = {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache",
               "use_mambapy", "use_associative_scan", "hidden_act", "intermediate_size", "rms_norm",
               "fused_add_norm", "pad_vocab_size_multiple", "n_layer", "d_model", "_name_or_path", "return_dict",
               "output_hidden_states", "output_attentions", "auto_map", "chunk_size_feed_forward", "id2label",
               "label2id", "problem_type", "tokenizer_class", "is_encoder_decoder", "tie_encoder_decoder"}
_UNSUPPORTED_MODEL_TYPES = {
    "mamba2": "it is a Mamba-2 (SSD) model; MoaiMamba is Mamba-1 (S6)",
    "falcon_mamba": "FalconMamba adds RMS norms on B, C and Δ inside the mixer, which MoaiMamba does not have",
}
_MAX_LISTED = 20


class ConversionError(MoaiError, ValueError):
    """A checkpoint or model cannot be converted; the message names the field or the tensors at fault."""


# Configs ------------------------------------------------------------------------------------------------------
def _build_config(fields: dict[str, Any], source: str) -> MoaiMambaConfig:
    try:
        return MoaiMambaConfig(**fields)
    except ConfigError as exc:
        raise ConversionError(f"{source}: the translated config is invalid: {exc}") from None


def config_from_mamba_ssm(cfg: dict[str, Any]) -> MoaiMambaConfig:
    """Translate a state-spaces/mamba `MambaConfig` (as a dict, i.e. its `config.json`) to ours.

    Raises `ConversionError` for what MoaiMamba cannot represent: `ssm_cfg.layer` other than "Mamba1",
    attention layers (`attn_layer_idx`), LayerNorm (`rms_norm=False`), unknown keys.
    """
    src = "mamba-ssm config"
    unknown = sorted(set(cfg) - _MAMBA_SSM_KEYS)
    if unknown:
        raise ConversionError(f"{src}: unknown key(s) {', '.join(unknown)}; mamba-ssm's MambaConfig has "
                              f"{', '.join(sorted(_MAMBA_SSM_KEYS))}")
    ssm_cfg = dict(cfg.get("ssm_cfg") or {})
    layer = ssm_cfg.get("layer", "Mamba1")
    if layer != "Mamba1":
        raise ConversionError(f"{src}: ssm_cfg.layer is {layer!r}; only 'Mamba1' (S6) mixers can be represented "
                              "by MoaiMamba (Mamba-2/SSD has multi-head states and a different parameter layout)")
    if cfg.get("attn_layer_idx"):
        raise ConversionError(f"{src}: attn_layer_idx={cfg['attn_layer_idx']} makes this a hybrid Mamba/attention "
                              "model; MoaiMamba is pure Mamba and has no attention layers")
    if not cfg.get("rms_norm", True):
        # mamba-ssm's MambaConfig defaults to rms_norm=True; False means LayerNorm with a bias.
        raise ConversionError(f"{src}: rms_norm=False means LayerNorm (with bias); MoaiMamba only has RMSNorm")
    bad_ssm = sorted(set(ssm_cfg) - set(_MAMBA1_SSM_CFG) - _MAMBA1_SSM_IGNORED)
    if bad_ssm:
        raise ConversionError(f"{src}: ssm_cfg has unsupported key(s) {', '.join(bad_ssm)} for a Mamba1 mixer; "
                              f"supported: {', '.join(sorted(_MAMBA1_SSM_CFG))}")
    d_intermediate = cfg.get("d_intermediate", 0)
    if not isinstance(d_intermediate, int) or d_intermediate < 0:
        raise ConversionError(f"{src}: d_intermediate must be an integer ≥ 0, got {d_intermediate!r}")
    m = MAMBA_SSM_MLP_MULTIPLE
    fields: dict[str, Any] = dict(
        vocab_size=cfg.get("vocab_size", 50277),
        hidden_size=cfg.get("d_model", 2560),
        num_hidden_layers=cfg.get("n_layer", 64),
        intermediate_size=(d_intermediate + m - 1) // m * m,  # what GatedMLP actually builds
        pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 8),
        residual_in_fp32=cfg.get("residual_in_fp32", True),
        tie_word_embeddings=cfg.get("tie_embeddings", True),
        rms_norm_eps=MAMBA_SSM_NORM_EPS,
    )
    fields.update({ours: ssm_cfg[theirs] for theirs, ours in _MAMBA1_SSM_CFG.items() if theirs in ssm_cfg})
    return _build_config(fields, src)


def config_to_mamba_ssm(config: MoaiMambaConfig, fused_add_norm: bool = True) -> dict[str, Any]:
    """Our config as a state-spaces/mamba `config.json` dict. `fused_add_norm` is only a kernel choice of
    mamba-ssm (True needs its Triton kernels on GPU; pass False to run it on CPU)."""
    if not math.isclose(config.rms_norm_eps, MAMBA_SSM_NORM_EPS):
        raise ConversionError(f"rms_norm_eps={config.rms_norm_eps} cannot be represented: mamba-ssm's "
                              f"MambaLMHeadModel always uses {MAMBA_SSM_NORM_EPS}")
    if config.intermediate_size % MAMBA_SSM_MLP_MULTIPLE:
        raise ConversionError(f"intermediate_size={config.intermediate_size} cannot be represented: mamba-ssm's "
                              f"GatedMLP rounds d_intermediate up to a multiple of {MAMBA_SSM_MLP_MULTIPLE}")
    ssm_cfg = {"layer": "Mamba1"}
    ssm_cfg.update({theirs: getattr(config, ours) for theirs, ours in _MAMBA1_SSM_CFG.items()})
    return dict(d_model=config.hidden_size, d_intermediate=config.intermediate_size,
                n_layer=config.num_hidden_layers, vocab_size=config.vocab_size, ssm_cfg=ssm_cfg, attn_layer_idx=[],
                attn_cfg={}, rms_norm=True, residual_in_fp32=config.residual_in_fp32, fused_add_norm=fused_add_norm,
                pad_vocab_size_multiple=config.pad_vocab_size_multiple, tie_embeddings=config.tie_word_embeddings)


def config_from_hf_mamba(cfg: dict[str, Any]) -> MoaiMambaConfig:
    """Translate an HF `MambaConfig` (as a dict, i.e. its `config.json`) to ours.

    HF's `vocab_size` is the embedding size itself, so no padding is added on top of it. Keys that HF Mamba
    itself ignores are ignored (with a warning); `hidden_act` other than SiLU and a `model_type` other than
    "mamba" are refused.
    """
    src = "HF Mamba config"
    model_type = cfg.get("model_type", "mamba")
    if model_type != "mamba":
        reason = _UNSUPPORTED_MODEL_TYPES.get(model_type, "it is not an HF Mamba-1 config")
        raise ConversionError(f"{src}: model_type {model_type!r} is not supported: {reason}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConversionError(f"{src}: hidden_act={act!r}; MoaiMamba's mixer uses SiLU only")
    if not cfg.get("rms_norm", True):
        raise ConversionError(f"{src}: rms_norm=False means LayerNorm; MoaiMamba only has RMSNorm")
    hidden, expand = cfg.get("hidden_size", 768), cfg.get("expand", 2)
    # HF writes `intermediate_size` = expand·hidden_size (the mixer width, not an MLP): check it agrees.
    inner = cfg.get("intermediate_size")
    if inner is not None and inner != expand * hidden:
        raise ConversionError(f"{src}: intermediate_size={inner} is not expand·hidden_size={expand * hidden}; "
                              "HF Mamba has no MLP and derives intermediate_size from expand")
    unknown = sorted(set(cfg) - set(_HF_FIELDS) - _HF_IGNORED)
    if unknown:
        logger.warning("%s: ignoring key(s) %s (HF MambaForCausalLM does not read them either)", src,
                       ", ".join(unknown))
    fields = {ours: cfg[theirs] for theirs, ours in _HF_FIELDS.items() if theirs in cfg}
    vocab = fields.get("vocab_size", 50280)
    # Keep the usual multiple of 8 where it adds nothing, otherwise no padding at all (shapes must match HF).
    fields["pad_vocab_size_multiple"] = 8 if vocab % 8 == 0 else 1
    fields.setdefault("tie_word_embeddings", True)  # HF's default
    fields.setdefault("rescale_prenorm_residual", False)
    return _build_config(fields, src)


def config_to_hf_mamba(config: MoaiMambaConfig) -> dict[str, Any]:
    """Our config as HF `MambaConfig` keyword arguments (vocab_size = our padded vocabulary)."""
    if config.intermediate_size > 0:
        raise ConversionError(
            f"intermediate_size={config.intermediate_size}: HF MambaForCausalLM has no MLP, so a model with one "
            "cannot be exported to it; use `save_mamba_ssm_checkpoint` (mamba-ssm has d_intermediate) or our format"
        )
    return dict(
        vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size, state_size=config.state_size,
        num_hidden_layers=config.num_hidden_layers, layer_norm_epsilon=config.rms_norm_eps,
        expand=config.expand_factor, conv_kernel=config.conv_kernel_size, use_bias=config.use_bias,
        use_conv_bias=config.use_conv_bias, hidden_act="silu", initializer_range=config.initializer_range,
        residual_in_fp32=config.residual_in_fp32, time_step_rank=config.time_step_rank,
        time_step_scale=config.dt_scale, time_step_min=config.dt_min, time_step_max=config.dt_max,
        time_step_init_scheme=config.dt_init, time_step_floor=config.dt_init_floor,
        # An init-only flag, but transformers 5.24's `MambaPreTrainedModel._init_weights` divides out_proj by
        # sqrt(num_hidden_layers) in place even for weights loaded by `from_pretrained`: always write False.
        rescale_prenorm_residual=False, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )


# State dicts --------------------------------------------------------------------------------------------------
def state_dict_from_hf_mamba(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Mamba parameter names → ours (`backbone.embeddings.` → `backbone.embedding.`)."""
    return {(OUR_EMBEDDING + k[len(HF_EMBEDDING):] if k.startswith(HF_EMBEDDING) else k): v
            for k, v in state_dict.items()}


def state_dict_to_hf_mamba(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names → HF Mamba's (`backbone.embedding.` → `backbone.embeddings.`)."""
    return {(HF_EMBEDDING + k[len(OUR_EMBEDDING):] if k.startswith(OUR_EMBEDDING) else k): v
            for k, v in state_dict.items()}


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" … and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _key_hints(config: MoaiMambaConfig, missing: list[str], unexpected: list[str]) -> list[str]:
    """Say which config field most likely disagrees with the weights."""
    hints = []
    keys = missing + unexpected
    if any(k.endswith(("in_proj.bias", "out_proj.bias")) for k in keys):
        hints.append(f"projection biases disagree with use_bias={config.use_bias}")
    if any(k.endswith("conv1d.bias") for k in keys):
        hints.append(f"conv biases disagree with use_conv_bias={config.use_conv_bias}")
    if any(".mlp." in k or ".norm2." in k for k in keys):
        hints.append(f"MLP weights disagree with intermediate_size={config.intermediate_size}")
    if "lm_head.weight" in missing:
        hints.append("the config says tie_word_embeddings=False but there is no lm_head.weight")
    parts = [k.split(".") for k in unexpected if k.startswith("backbone.layers.")]
    layers = {int(p[2]) for p in parts if p[2].isdigit()}
    if layers and max(layers) >= config.num_hidden_layers:
        hints.append(f"the weights have layer {max(layers)} but num_hidden_layers={config.num_hidden_layers}")
    return hints


def _load_into_model(config: MoaiMambaConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None,
                     source: str) -> MoaiMambaForCausalLM:
    """Build the model without initialising it and copy `state_dict` in, after checking every name and shape."""
    if dtype is None:
        emb = state_dict.get(OUR_EMBEDDING + "weight")
        dtype = emb.dtype if emb is not None and emb.is_floating_point() else torch.float32
    with torch.device("meta"):
        model = MoaiMambaForCausalLM(config)
    model.to(dtype)  # A_log and D stay fp32 (MambaMixer._apply)
    # to_empty makes new Parameter objects: keep their Python attributes (e.g. A_log/D `_no_weight_decay`).
    marks = {name: dict(vars(p)) for name, p in model.named_parameters() if vars(p)}
    model.to_empty(device="cpu")  # storage only: every tensor is overwritten below
    for name, p in model.named_parameters():
        for key, value in marks.get(name, {}).items():
            setattr(p, key, value)
    tied = config.tie_word_embeddings
    if tied:
        model.tie_weights()
        if model.lm_head.weight is not model.backbone.embedding.weight:
            raise RuntimeError("tie_weights() did not tie lm_head.weight to backbone.embedding.weight")
    expected = model.state_dict()
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(set(expected) - set(state_dict) - optional)
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        lines = [f"{source}: the weights do not match the config"]
        if missing:
            lines.append(f"missing key(s): {_listed(missing)}")
        if unexpected:
            lines.append(f"unexpected key(s): {_listed(unexpected)}")
        hints = _key_hints(config, missing, unexpected)
        if hints:
            lines.append("likely cause: " + "; ".join(hints))
        raise ConversionError("\n  ".join(lines))
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in state_dict.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ConversionError(f"{source}: tensor shapes do not match the config:\n  "
                              + "\n  ".join(wrong[:_MAX_LISTED]))
    if tied and "lm_head.weight" in state_dict:
        if not torch.equal(state_dict["lm_head.weight"], state_dict[OUR_EMBEDDING + "weight"]):
            raise ConversionError(f"{source}: the config ties the embeddings (tie_embeddings/tie_word_embeddings) "
                                  "but lm_head.weight differs from the embedding; set it to false in config.json")
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=False)
    return model.eval()


# Reading a directory --------------------------------------------------------------------------------------------
def _read_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Weights of a model directory: safetensors (single or sharded) first, then pickle files if allowed."""
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return _read_shards(path, index, load_file)
    pickles = [p for p in (path / "pytorch_model.bin", path / "pytorch_model.bin.index.json") if p.is_file()]
    if not pickles:
        raise ConversionError(f"{path}: no weights found (looked for model.safetensors, "
                              "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json)")
    if not allow_pickle:
        raise ConversionError(
            f"{path}: the only weights are {pickles[0].name}, a pickle file; unpickling an untrusted file can run "
            "arbitrary code. Pass allow_pickle=True if you trust it (it is then read with "
            "torch.load(weights_only=True)), or convert it to model.safetensors first"
        )

    def read_bin(file: Path) -> dict[str, torch.Tensor]:
        try:
            state_dict = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ConversionError(f"{file}: refused by torch.load(weights_only=True), it holds more than "
                                  f"tensors: {exc}") from None
        if not isinstance(state_dict, dict):
            raise ConversionError(f"{file}: expected a state dict of tensors, got a {type(state_dict).__name__}")
        bad = sorted(str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
        if bad:
            raise ConversionError(f"{file}: expected a state dict of tensors; non-tensor entries: {_listed(bad)}")
        return state_dict

    if pickles[0].name == "pytorch_model.bin":
        return read_bin(pickles[0])
    return _read_shards(path, pickles[0], read_bin)


def _read_shards(path: Path, index: Path, read) -> dict[str, torch.Tensor]:
    shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    state_dict: dict[str, torch.Tensor] = {}
    for shard in shards:
        state_dict.update(read(path / shard))
    return state_dict


def _detect_format(cfg: dict[str, Any], config_path: Path) -> str:
    model_type = cfg.get("model_type")
    if model_type == MoaiMambaConfig.model_type:
        return "moai"
    if model_type is not None:
        return "hf_mamba"  # `config_from_hf_mamba` refuses model types other than "mamba", with the reason
    if "d_model" in cfg and "n_layer" in cfg:
        return "mamba_ssm"
    raise ConversionError(f"{config_path}: not a recognised Mamba config (no model_type 'moai_mamba' or "
                          "'mamba', and no state-spaces/mamba d_model/n_layer)")


def load_external_checkpoint(path: str | os.PathLike, dtype: torch.dtype | str | None = None, *,
                             allow_pickle: bool = False) -> MoaiMambaForCausalLM:
    """Load a model directory written by state-spaces/mamba, HF `MambaForCausalLM` or MOAI itself.

    dtype: parameter dtype (A_log and D stay fp32); None keeps the checkpoint's (the embedding's) dtype.
    allow_pickle: read `pytorch_model.bin` (mamba-ssm's only format) through `torch.load(weights_only=True)`;
        off by default, since unpickling untrusted files can run code. safetensors files are always preferred.
    Returns the model in eval mode. Raises `ConversionError` naming what cannot be represented or which weights
    are missing, unexpected or misshapen.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{path}: not a model directory (no config.json)")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{config_path}: expected a JSON object, got {type(raw).__name__}")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConversionError(f"dtype {dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
        dtype = getattr(torch, dtype)
    fmt = _detect_format(raw, config_path)
    try:
        if fmt == "moai":
            config = load_mamba_config(path)
        elif fmt == "hf_mamba":
            config = config_from_hf_mamba(raw)
        else:
            config = config_from_mamba_ssm(raw)
    except (ConversionError, ConfigError) as exc:
        raise ConversionError(f"{config_path}: {exc}") from None
    state_dict = _read_weights(path, allow_pickle)
    if fmt == "hf_mamba":
        state_dict = state_dict_from_hf_mamba(state_dict)
    logger.info("loading %s checkpoint from %s", fmt, path)
    return _load_into_model(config, state_dict, dtype, str(path))


# Writing --------------------------------------------------------------------------------------------------------
def _plain_state_dict(model: MoaiMambaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors, checked to be exactly those of an unmodified model of its config (no quantized or
    added modules, which an external loader would not understand)."""
    with torch.device("meta"):
        reference = MoaiMambaForCausalLM(model.config)
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    extra = sorted(set(state_dict) - set(reference.state_dict()))
    absent = sorted(set(reference.state_dict()) - set(state_dict))
    if extra or absent:
        raise ConversionError(f"the model's tensors are not those of a plain MoaiMambaForCausalLM (quantized or "
                              f"modified?): extra {_listed(extra) or 'none'}; missing {_listed(absent) or 'none'}")
    return state_dict


def _save_safetensors(state_dict: dict[str, torch.Tensor], file: Path, tied: bool) -> None:
    # safetensors stores no shared tensors: a tied lm_head is left out, as HF does; loaders re-tie it.
    tensors = {k: v.contiguous().cpu() for k, v in state_dict.items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, file, metadata={"format": "pt"})


def export_to_hf_mamba(model: MoaiMambaForCausalLM, out_dir: str | os.PathLike) -> Path:
    """Write an MLP-free model as an HF `MambaForCausalLM` directory (config.json + model.safetensors) that
    `transformers.MambaForCausalLM.from_pretrained` loads. HF's vocab_size is our padded vocabulary; HF does not
    mask the padding rows of the logits as we do. Raises `ConversionError` if the model has an MLP."""
    from transformers import MambaConfig

    hf_config = MambaConfig(**config_to_hf_mamba(model.config))
    hf_config.architectures = ["MambaForCausalLM"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = state_dict_to_hf_mamba(_plain_state_dict(model))
    hf_config.save_pretrained(out)
    _save_safetensors(state_dict, out / "model.safetensors", model.config.tie_word_embeddings)
    return out


def save_mamba_ssm_checkpoint(model: MoaiMambaForCausalLM, out_dir: str | os.PathLike, *,
                              write_pytorch_bin: bool = False, fused_add_norm: bool = True) -> Path:
    """Write a state-spaces/mamba directory: its `config.json` and `model.safetensors` (same tensor names).

    mamba-ssm's own `MambaLMHeadModel.from_pretrained` reads only `pytorch_model.bin` (a pickle of the state dict,
    with the tied lm_head included); `write_pytorch_bin=True` writes that file as well (it costs one more copy of
    the weights on disk). `load_external_checkpoint` reads either. `fused_add_norm` is recorded in the config:
    True is mamba-ssm's default (Triton kernels, GPU); False lets mamba-ssm run the model on CPU.
    Raises `ConversionError` for what mamba-ssm cannot represent (an MLP width that is not a multiple of 128,
    rms_norm_eps other than 1e-5).
    """
    ssm_config = config_to_mamba_ssm(model.config, fused_add_norm=fused_add_norm)
    state_dict = _plain_state_dict(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(ssm_config, indent=4), encoding="utf-8")
    _save_safetensors(state_dict, out / "model.safetensors", model.config.tie_word_embeddings)
    if write_pytorch_bin:
        torch.save({k: v.cpu() for k, v in state_dict.items()}, out / "pytorch_model.bin")
    return out
