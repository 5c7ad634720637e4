"""Parameter counts and weight-memory estimates of a config, from a model built on the meta device.

Building on the meta device allocates no storage, so even the 16b preset costs a few milliseconds. Counting
walks the real module tree (not a formula), so it cannot drift from `mamba.py`; tests check it against the
closed form in `moai_lib.config`'s docstring. Every parameter must fall into a named component: a parameter
this file does not know raises, rather than being silently left out of the totals.
"""

from __future__ import annotations

import math
import re

import torch

from ..config import PRESET_TARGET_PARAMS, MoaiMambaConfig, get_mamba_config, preset_names
from .mamba import MoaiMambaForCausalLM

# Per-layer components, in forward order. "norms" = norm + norm2; "mlp" = fc1 + fc2.
LAYER_COMPONENTS = ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log+D", "out_proj", "norms", "mlp")

# Weights stored at 4 bits in the int4 estimate: the large matmuls. dt_proj (input width dt_rank, not a
# multiple of the group size), conv1d, A_log, D, norms and the embeddings stay in high precision, as in the
# Mamba quantization literature (Quamba, MambaQuant).
INT4_COMPONENTS = ("in_proj", "x_proj", "out_proj", "mlp")
INT4_GROUP_SIZE = 128
FP32_COMPONENTS = ("A_log+D",)  # the model keeps A_log and D in fp32 whatever its dtype (see mamba.py)

_LAYER_PARAM = re.compile(r"backbone\.layers\.(\d+)\.(.+)")
_LAYER_PREFIXES = {
    "mixer.in_proj.": "in_proj", "mixer.conv1d.": "conv1d", "mixer.x_proj.": "x_proj",
    "mixer.dt_proj.": "dt_proj", "mixer.out_proj.": "out_proj", "norm.": "norms", "norm2.": "norms",
    "mlp.": "mlp",
}


def build_meta_model(config: MoaiMambaConfig) -> MoaiMambaForCausalLM:
    """The model with every tensor on the meta device: shapes only, no memory, no init cost."""
    with torch.device("meta"):
        return MoaiMambaForCausalLM(config)


def _component(name: str) -> tuple[int | None, str]:
    """Parameter name → (layer index or None, component)."""
    top = {"backbone.embedding.weight": "embedding", "lm_head.weight": "lm_head",
           "backbone.norm_f.weight": "norm_f"}
    if name in top:
        return None, top[name]
    match = _LAYER_PARAM.fullmatch(name)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
        if rest in ("mixer.A_log", "mixer.D"):
            return layer, "A_log+D"
        for prefix, component in _LAYER_PREFIXES.items():
            if rest.startswith(prefix):
                return layer, component
    raise ValueError(f"parameter {name!r} belongs to no component known to moai_lib.model.info; add it there")


def _named_parameters(model: MoaiMambaForCausalLM):
    """(layer, component, name, meta tensor) for every distinct parameter (a tied weight appears once)."""
    for name, param in model.named_parameters():  # remove_duplicate=True: a tied lm_head is skipped
        layer, component = _component(name)
        yield layer, component, name, param


def count_parameters(config: MoaiMambaConfig) -> dict:
    """Parameter counts per component.

    Returns a dict:
        embedding, lm_head (0 when tied), norm_f, total: ints
        tied: whether lm_head shares the embedding matrix (then counted once, under embedding)
        layers: one dict per layer, {component: count for LAYER_COMPONENTS} plus "total"
        layer_components: {component: count summed over all layers}
    """
    model = build_meta_model(config)
    layers = [dict.fromkeys(LAYER_COMPONENTS, 0) for _ in range(config.num_hidden_layers)]
    top = {"embedding": 0, "lm_head": 0, "norm_f": 0}
    for layer, component, _, param in _named_parameters(model):
        if layer is None:
            top[component] += param.numel()
        else:
            layers[layer][component] += param.numel()
    for layer in layers:
        layer["total"] = sum(layer[c] for c in LAYER_COMPONENTS)
    layer_components = {c: sum(layer[c] for layer in layers) for c in LAYER_COMPONENTS}
    total = sum(top.values()) + sum(layer_components.values())
    tied = model.lm_head.weight is model.backbone.embedding.weight
    return {**top, "tied": tied, "layers": layers,
            "layer_components": layer_components, "total": total}


def estimate_memory(config: MoaiMambaConfig, group_size: int = INT4_GROUP_SIZE) -> dict:
    """Bytes of the weights (no activations, no optimizer state) at bf16 and at int4 weight-only.

    bf16: every parameter at 2 bytes, except A_log and D at 4 (the model keeps them fp32).
    int4: the weight matrices of INT4_COMPONENTS at 4 bits plus one fp16 scale per group of `group_size`
    consecutive input channels of each output row (symmetric, no zero points); their biases and every
    other parameter as in bf16.

    Also returns the decoding cache of one sequence (conv states bf16, SSM states fp32), which is fixed
    whatever the context length.
    """
    if group_size <= 0:
        raise ValueError(f"group_size must be > 0, got {group_size}")
    bf16 = int4 = quantized = scales = 0
    for _, component, name, param in _named_parameters(build_meta_model(config)):
        full = param.numel() * (4 if component in FP32_COMPONENTS else 2)
        bf16 += full
        if component in INT4_COMPONENTS and name.endswith(".weight"):
            out_features, in_features = param.shape
            n_scales = out_features * math.ceil(in_features / group_size)
            int4 += param.numel() // 2 + 2 * n_scales
            quantized += param.numel()
            scales += n_scales
        else:
            int4 += full
    E, W, N = config.d_inner, config.conv_kernel_size, config.state_size
    cache = config.num_hidden_layers * (E * (W - 1) * 2 + E * N * 4)
    return {"bf16_bytes": bf16, "int4_bytes": int4, "int4_quantized_params": quantized,
            "int4_scales": scales, "group_size": group_size, "cache_bytes_per_sequence": cache}


def memory_assumptions(group_size: int = INT4_GROUP_SIZE) -> str:
    """One sentence that states what `estimate_memory` assumes (printed next to its numbers)."""
    return (f"weights only; bf16: all weights 2 bytes except A_log and D kept fp32; int4: in_proj, x_proj, "
            f"out_proj and MLP weights at 4 bits + one fp16 scale per group of {group_size} inputs "
            f"(symmetric, no zero points), embedding, lm_head, conv1d, dt_proj, norms and biases at bf16")


# Formatting ------------------------------------------------------------------------------------------------
def human_count(n: float) -> str:
    """1234567 → '1.23M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _describe(config: MoaiMambaConfig) -> str:
    vocab = f"{config.vocab_size:,}"
    if config.padded_vocab_size != config.vocab_size:
        vocab += f" (padded to {config.padded_vocab_size:,})"
    return (f"d={config.hidden_size}, layers={config.num_hidden_layers}, d_inner={config.d_inner}, "
            f"state N={config.state_size}, dt_rank={config.time_step_rank}, conv={config.conv_kernel_size}, "
            f"MLP={config.intermediate_size or 'none'}, vocab={vocab}")


def format_model_info(config: MoaiMambaConfig, name: str | None = None, verbose: bool = False) -> str:
    """The report printed by `moai model-info`: counts per component, memory, and (verbose) every layer."""
    counts, memory = count_parameters(config), estimate_memory(config)
    total = counts["total"]
    n_layers = config.num_hidden_layers

    def share(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    lines = [f"MoaiMamba {name or 'config'}: {_describe(config)}", "",
             f"{'component':<22}{'per layer':>16}{'all layers':>18}{'share':>8}"]
    lines.append(f"{'embedding':<22}{'':>16}{counts['embedding']:>18,}{share(counts['embedding']):>8}")
    if counts["tied"]:
        lines.append(f"{'lm_head':<22}{'':>16}{'tied':>18}{'':>8}   (shares the embedding, counted once)")
    else:
        lines.append(f"{'lm_head':<22}{'':>16}{counts['lm_head']:>18,}{share(counts['lm_head']):>8}")
    uniform = all(layer == counts["layers"][0] for layer in counts["layers"])
    for component in LAYER_COMPONENTS:
        if component == "mlp" and config.intermediate_size == 0:
            continue
        label = component if component in ("norms", "mlp") else f"mixer.{component}"
        per_layer = f"{counts['layers'][0][component]:,}" if uniform else "varies"
        summed = counts["layer_components"][component]
        lines.append(f"  {label:<20}{per_layer:>16}{summed:>18,}{share(summed):>8}")
    layers_total = sum(counts["layer_components"].values())
    per_layer_total = f"{counts['layers'][0]['total']:,}" if uniform else "varies"
    lines.append(f"  {f'{n_layers} layers':<20}{per_layer_total:>16}{layers_total:>18,}{share(layers_total):>8}")
    lines.append(f"{'norm_f':<22}{'':>16}{counts['norm_f']:>18,}{share(counts['norm_f']):>8}")
    lines.append(f"{'total':<22}{'':>16}{total:>18,}   ({human_count(total)})")
    lines += [
        "",
        f"memory bf16: {human_bytes(memory['bf16_bytes'])} ({memory['bf16_bytes']:,} bytes)",
        f"memory int4: {human_bytes(memory['int4_bytes'])} ({memory['int4_bytes']:,} bytes; "
        f"{memory['int4_quantized_params']:,} params at 4 bits, {memory['int4_scales']:,} fp16 scales)",
        f"  assumption: {memory_assumptions(memory['group_size'])}",
        f"decoding cache per sequence: {human_bytes(memory['cache_bytes_per_sequence'])} "
        "(conv states bf16, SSM states fp32; independent of context length)",
    ]
    if verbose:
        header = f"{'layer':>5}" + "".join(f"{c:>13}" for c in LAYER_COMPONENTS) + f"{'total':>14}"
        lines += ["", "per layer:", header]
        for i, layer in enumerate(counts["layers"]):
            lines.append(f"{i:>5}" + "".join(f"{layer[c]:>13,}" for c in LAYER_COMPONENTS)
                         + f"{layer['total']:>14,}")
    target = PRESET_TARGET_PARAMS.get(str(name).lower()) if name else None
    if target:
        lines += ["", f"advertised {human_count(target)}: deviation {100 * (total - target) / target:+.1f}%"]
    return "\n".join(lines)


def format_size_summary(names: list[str] | None = None) -> str:
    """One line per preset: parameters, advertised target and deviation, memory at bf16 and int4."""
    header = (f"{'preset':<7}{'params':>10}{'target':>9}{'deviation':>11}{'bf16':>12}{'int4':>12}"
              f"{'d':>7}{'layers':>8}{'MLP':>7}{'vocab':>9}  embeddings")
    lines = [header]
    for name in names or preset_names():
        config = get_mamba_config(name)
        total = count_parameters(config)["total"]
        memory = estimate_memory(config)
        target = PRESET_TARGET_PARAMS.get(name)
        target_s = human_count(target) if target else "-"
        deviation = f"{100 * (total - target) / target:+.1f}%" if target else "-"
        lines.append(
            f"{name:<7}{human_count(total):>10}{target_s:>9}{deviation:>11}{human_bytes(memory['bf16_bytes']):>12}"
            f"{human_bytes(memory['int4_bytes']):>12}{config.hidden_size:>7}{config.num_hidden_layers:>8}"
            f"{config.intermediate_size:>7}{config.vocab_size:>9}  {'tied' if config.tie_word_embeddings else 'untied'}"
        )
    lines.append(f"memory: {memory_assumptions()}")
    return "\n".join(lines)
