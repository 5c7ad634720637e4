"""The export stage: a variant directory → a self-describing Hugging Face model directory.

    export_model("outputs/models/quantized/gptq", "outputs/exports/gptq", variant="gptq", metrics=m,
                 params=ExportParams())

The export holds model.safetensors, config.json (with `auto_map`), generation_config.json, the tokenizer files,
README.md (a model card with the measured metrics, intended use, training data, quantization details and how
to load it), DATA_SOURCES.md (the corpus' SOURCES file, when given) and two small remote-code modules:

- `AutoModelForCausalLM.from_pretrained(dir)` after `import moai_lib` loads it with the installed library.
- `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it without importing moai_lib
  first: config.json's `auto_map` points at `configuration_moai.py` / `modeling_moai.py`, which subclass the
  installed `moai_lib` classes (the model and the quantized layers live there, so `pip install moai` is
  required; the modules say so). Importing them registers the "moai" quantization format with transformers,
  so a quantized export loads with its quantized layers, not dequantized.

With `format: compressed-tensors` a quantized variant's weights are written in the compressed-tensors format
(`moai_lib.quant.compressed_tensors`: "pack-quantized" INT4/INT8, "float-quantized" FP8; what vLLM loads) instead
of the moai format; the float variant (bf16) is a plain dense checkpoint in either format. Variants the format
cannot express are refused when the params are read (`ExportParams.check_quantize`).

The directory is built in a temporary sibling, verified (moai format: reloaded from disk, same quantized module
types and bit-identical logits as the variant it came from; compressed-tensors: every tensor re-read from disk and
each quantized layer decoded to exactly the variant's dequantized weight) and renamed into place: a failure
leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.tokenizer import fsync_dir, make_temp_dir, replace_dir
from ..quant import dequantize_compressed, export_compressed_tensors, quantized_modules
from .errors import PipelineError
from .evaluation import load_variant, variant_method

logger = logging.getLogger(__name__)

CONFIG_MODULE = "configuration_moai"
MODELING_MODULE = "modeling_moai"
AUTO_MAP = {"AutoConfig": f"{CONFIG_MODULE}.MoaiMambaConfig",
            "AutoModelForCausalLM": f"{MODELING_MODULE}.MoaiMambaForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")

# The remote-code modules written into every export. They are thin on purpose: the model, its kernels and the
# quantized layers are the installed moai_lib's, so an export never carries a stale copy of them.
REMOTE_CONFIG_SOURCE = '''"""Remote code of a MOAI export, loaded by `trust_remote_code=True`: the config class.

Requires the `moai` package (`pip install moai`; it provides the `moai_lib` module with the model, its kernels
and the quantized layers). Importing it registers the "moai" quantization format with transformers, so a
quantized export loads with its quantized layers.
"""

import moai_lib  # noqa: F401  (registers model type "moai_mamba" and the "moai" quantizer)
from moai_lib.config import MoaiMambaConfig as _MoaiMambaConfig


class MoaiMambaConfig(_MoaiMambaConfig):
    """`moai_lib.config.MoaiMambaConfig`, declared in this file so that config.json's auto_map can name it."""
'''

REMOTE_MODELING_SOURCE = '''"""Remote code of a MOAI export, loaded by `trust_remote_code=True`: the model class.

Requires the `moai` package (`pip install moai`); see configuration_moai.py.
"""

from moai_lib.model.mamba import MoaiMambaForCausalLM as _MoaiMambaForCausalLM

from .configuration_moai import MoaiMambaConfig


class MoaiMambaForCausalLM(_MoaiMambaForCausalLM):
    """`moai_lib.MoaiMambaForCausalLM` bound to this export's config class."""

    config_class = MoaiMambaConfig
'''


EXPORT_FORMATS = ("hf", "compressed-tensors")
CT_AWQ_LAYERS = {"in_proj", "fc1"}  # AWQ layers whose scales fold into the preceding norm


@dataclass
class ExportParams:
    """Parameters of the export stage (one section of params.yaml).

    Args:
        model_name: name of the exported model in its card; the card title is "<model_name>-<variant>".
        license: license identifier written into the card's metadata (the code's license; the training
            data's licenses are listed in the card).
        sources: the corpus' SOURCES.md (licenses and provenance of the training text), quoted in the card and
            copied as DATA_SOURCES.md; relative paths are taken from the run root. None: the card says the
            training data is undocumented.
        remote_code: write the remote-code modules and `auto_map`, so the export loads with
            `trust_remote_code=True` without importing moai_lib first.
        verify: reload the export before renaming it into place and check it matches the variant (quantized
            module types, bit-identical logits on a fixed input).
        description: a paragraph for the card (what this model is for); a default one is used when empty.
        format: "hf" (the moai format: loads back into moai_lib with its quantized layers) or
            "compressed-tensors" (quantized weights in the compressed-tensors format for vLLM/llm-compressor:
            INT4/INT8 RTN, QAT, GPTQ without act-order g_idx, AWQ on in_proj/fc1 only, FP8; not FP4 or
            bitsandbytes).
    """

    model_name: str = "moai-mamba"
    license: str = "apache-2.0"
    sources: str | None = "data/sample/SOURCES.md"
    remote_code: bool = True
    verify: bool = True
    description: str = ""
    format: str = "hf"

    def __post_init__(self):
        if not isinstance(self.model_name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.model_name):
            raise PipelineError(f"export.model_name must be a name of letters, digits, '.', '_' or '-', got "
                                f"{self.model_name!r}")
        if not isinstance(self.license, str) or not self.license:
            raise PipelineError(f"export.license must be a license identifier such as 'apache-2.0', got "
                                f"{self.license!r}")
        if self.sources is not None and not isinstance(self.sources, str | os.PathLike):
            raise PipelineError(f"export.sources must be a path or null, got {self.sources!r}")
        for name in ("remote_code", "verify"):
            if not isinstance(getattr(self, name), bool):
                raise PipelineError(f"export.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.description, str):
            raise PipelineError(f"export.description must be a string, got {self.description!r}")
        if self.format not in EXPORT_FORMATS:
            raise PipelineError(f"export.format must be one of {', '.join(map(repr, EXPORT_FORMATS))}, got "
                                f"{self.format!r}")

    def check_quantize(self, quantize) -> None:
        """Refuse quantize variants that `format` cannot express (`quantize`: the params' QuantizeParams)."""
        if self.format != "compressed-tensors":
            return
        for name in quantize.methods:
            method, layers, config = quantize.method_type(name), quantize.layers(name), quantize.config(name)
            problem = fix = None
            if method in ("fp4", "bnb"):
                kind = "FP4" if method == "fp4" else "bitsandbytes"
                problem, fix = f"{kind} layers have no compressed-tensors layout here", "drop the variant"
            elif method == "awq" and not set(layers or ["default"]) <= CT_AWQ_LAYERS:
                problem = ("AWQ's scales for x_proj, out_proj and fc2 are applied to their inputs at run time, "
                           "which the format cannot store")
                fix = f"set quantize.methods.{name}.layers: [in_proj, fc1] (their scales fold into the norms)"
            elif method == "gptq" and config.act_order and not config.static_groups and config.group_size != -1:
                problem = "GPTQ act-order without static groups needs a permuted g_idx, which the format dropped"
                fix = f"set quantize.methods.{name}.static_groups: true"
            if problem:
                raise PipelineError(f"export.format: 'compressed-tensors' cannot express variant {name!r} "
                                    f"({method}): {problem}; {fix}, or use export.format: hf")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ExportParams:
        """Build from the `export:` section of a params file; an unknown key is an error naming it."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PipelineError(f"unknown parameter(s) {', '.join(f'export.{k}' for k in unknown)}; valid: "
                                f"{', '.join(sorted(known))}")
        return cls(**data)


# Pieces of the export ---------------------------------------------------------------------------------------
def find_tokenizer(model_dir: Path, tokenizer_dir: str | os.PathLike | None) -> Path:
    """The tokenizer to ship: `tokenizer_dir` when given, else the one saved in the variant directory."""
    for candidate in ([Path(tokenizer_dir)] if tokenizer_dir is not None else []) + [model_dir]:
        if (candidate / "tokenizer.json").is_file() or (candidate / "tokenizer_config.json").is_file():
            return candidate
    raise PipelineError(f"no tokenizer in {model_dir}{f' or {tokenizer_dir}' if tokenizer_dir else ''}; pass "
                        "tokenizer_dir (the data directory's tokenizer/) to export_model")


def _json_dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _add_auto_map(export_dir: Path) -> None:
    (export_dir / f"{CONFIG_MODULE}.py").write_text(REMOTE_CONFIG_SOURCE, encoding="utf-8")
    (export_dir / f"{MODELING_MODULE}.py").write_text(REMOTE_MODELING_SOURCE, encoding="utf-8")
    config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
    config["auto_map"] = dict(AUTO_MAP)
    _json_dump(export_dir / "config.json", config)


def _set_generation_config(model: nn.Module, tokenizer) -> None:
    """Greedy by default, with the tokenizer's eos/pad/bos ids (pad falls back to eos)."""
    from transformers import GenerationConfig

    gen = model.generation_config if getattr(model, "generation_config", None) is not None else GenerationConfig()
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    gen.do_sample = False
    model.generation_config = gen


def _sources_summary(text: str) -> str:
    """The per-source rows of a SOURCES.md table (id, lang, package, licence), as a compact Markdown table."""
    lines = text.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("| id |")), None)
    if header is None:
        return ""
    cols = [c.strip() for c in lines[header].strip("|").split("|")]
    wanted = [c for c in ("id", "lang", "registry", "package", "licence", "license") if c in cols]
    out = ["| " + " | ".join(wanted) + " |", "|" + "---|" * len(wanted)]
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(cols):
            out.append("| " + " | ".join(cells[cols.index(c)] for c in wanted) + " |")
    return "\n".join(out) + "\n"


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def model_card(*, name: str, variant: str, method: str, metrics: dict, config: dict, params: ExportParams,
               sources_text: str | None, languages: list[str]) -> str:
    """The README.md of an export (YAML metadata, then the card's sections)."""
    from .. import __version__

    qc = config.get("quantization_config")
    tags = ["mamba", "ssm", "moai", "text-generation"] + ([f"quantized-{method}"] if qc else [])
    meta = ["---", f"license: {params.license}", "library_name: transformers", "pipeline_tag: text-generation"]
    if languages:
        meta += ["language:"] + [f"- {lang}" for lang in languages]
    meta += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    arch = (f"{config.get('num_hidden_layers')} Mamba-1 layers, hidden size {config.get('hidden_size')}, "
            f"SSM state {config.get('state_size')}, MLP width {config.get('intermediate_size')}, "
            f"vocabulary {config.get('vocab_size')}")
    description = params.description or (
        f"A small pure-Mamba (selective state space) causal language model trained with MOAI: {arch}. "
        f"This is the `{variant}` variant" + (f", quantized with `{method}`." if qc else ", in high precision."))
    rows = [f"| {k} | {_format(v)} |" for k, v in metrics.items()
            if isinstance(v, int | float | str) and not isinstance(v, bool)]
    sections = [
        f"# {name}", "", description, "",
        "## Evaluation", "",
        "Measured by `moai_lib.pipeline.evaluation.evaluate_variant` on the validation split of the training "
        "corpus (perplexity overall and per language `ppl_<lang>`; size of the weight files; bits per weight "
        "of the quantized layers incl. scales and zero points; prefill/decode tokens per second and peak memory "
        "on the device named below).", "",
        "| metric | value |", "|---|---:|", *(rows or ["| (none) | |"]), "",
        "## Intended use and limitations", "",
        "A research and demonstration model: comparing quantization methods on a Mamba LM, testing inference "
        "stacks, a starting point for fine-tuning. It is small and trained on little text, so its output is "
        "often wrong or incoherent; it has no safety tuning and must not be used for decisions about people or "
        "as a source of facts. Perplexity figures are on held-out text of the same corpus, not a benchmark of "
        "general ability.", "",
        "## Training data", "",
    ]
    if sources_text:
        summary = _sources_summary(sources_text)
        sections += ["The training corpus's sources and licenses (full provenance, splits and cleaning in "
                     "[DATA_SOURCES.md](DATA_SOURCES.md)):", "", summary or "(see DATA_SOURCES.md)", ""]
    else:
        sections += ["Not documented for this export (no SOURCES file was given).", ""]
    sections += ["## Quantization", ""]
    if qc and qc.get("quant_method") == "compressed-tensors":
        for group in qc["config_groups"].values():
            w, a = group["weights"], group.get("input_activations")
            acts = f"{a['type']}{a['num_bits']} {a['strategy']} {'dynamic' if a['dynamic'] else 'static'}" \
                if a else "16-bit"
            sections.append(f"- `{group['format']}` on {', '.join(group['targets'])}: weights {w['type']}"
                            f"{w['num_bits']} {w['strategy']}" + (f" {w['group_size']}" if w.get("group_size") else "")
                            + f", {'symmetric' if w['symmetric'] else 'asymmetric'}; activations {acts}")
        sections += [f"- kept in high precision (`ignore`): {', '.join(qc.get('ignore', [])) or 'none'}",
                     f"- Stored in the compressed-tensors format (quant_method \"compressed-tensors\", "
                     f"{qc['format']}), which vLLM and llm-compressor load; `{method}` is the method that produced "
                     "the integers/FP8 values.", ""]
    elif qc:
        policy = qc.get("policy", {})
        for entry in qc.get("methods", []):
            settings = {k: v for k, v in entry.items() if k not in ("method", "modules")}
            sections.append(f"- `{entry['method']}` on {len(entry.get('modules', []))} layers: "
                            + ", ".join(f"{k}={v}" for k, v in settings.items()))
        sections += [f"- kept in high precision: {', '.join(policy.get('kept_high_precision', [])) or 'none'}; "
                     f"never quantized: {', '.join(policy.get('never_quantized', []))}",
                     "- Stored quantized (packed integers / FP8 bits with their scales) in model.safetensors; "
                     "config.json's `quantization_config` (quant_method \"moai\") lists each layer's layout, and "
                     "loading rebuilds the quantized layers.", ""]
    else:
        sections += [f"None: weights stored as {config.get('dtype') or config.get('torch_dtype') or 'float'}.", ""]
    sections += [
        "## How to load", "",
        "With the MOAI library installed (`pip install moai`, version "
        f"{__version__} or later):", "",
        "```python", "import moai_lib  # registers the model type and the \"moai\" quantization format",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/dir\")",
        "tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/dir\")", "```", "",
        "Without importing moai_lib yourself (the remote-code modules configuration_moai.py and modeling_moai.py "
        "in this directory import it, so `pip install moai` is still required):", "",
        "```python", "from transformers import AutoModelForCausalLM", "",
        "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/dir\", trust_remote_code=True)", "```", "",
        "Generation uses the O(1)-per-token recurrent cache: "
        "`model.generate(**tokenizer(text, return_tensors=\"pt\"))`.",
        "",
    ]
    return "\n".join(meta + sections)


# Verification ------------------------------------------------------------------------------------------------
def _probe_ids(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)


@torch.inference_mode()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(model.device), use_cache=False).logits.float().cpu()


def verify_export(export_dir: Path, reference: nn.Module) -> None:
    """Reload `export_dir` and check it is `reference`: same quantized module types, bit-identical logits."""
    reloaded = load_variant(export_dir, device=reference.device, dtype="auto")
    expected = {fqn: type(m) for fqn, m in quantized_modules(reference).items()}
    found = {fqn: type(m) for fqn, m in quantized_modules(reloaded).items()}
    if found != expected:
        raise PipelineError(f"export: {export_dir} reloads with quantized layers {sorted(found)} of types "
                            f"{sorted({t.__name__ for t in found.values()})}, expected {sorted(expected)}")
    ids = _probe_ids(reference)
    if not torch.equal(_logits(reloaded, ids), _logits(reference, ids)):
        raise PipelineError(f"export: the model reloaded from {export_dir} computes different logits than the "
                            "variant it was exported from")


def verify_compressed_export(export_dir: Path, reference: nn.Module) -> None:
    """Re-read a compressed-tensors export: each quantized layer decodes to exactly `reference`'s dequantized
    weight, every other tensor equals the variant's."""
    from safetensors.torch import load_file

    config = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    tensors = load_file(export_dir / "model.safetensors")
    modules = quantized_modules(reference)
    groups = list(config["config_groups"].values())
    for fqn, module in modules.items():
        scheme = groups[0] if len(groups) == 1 else next(g for g in groups if fqn in g["targets"])
        local = {k[len(fqn) + 1:]: v for k, v in tensors.items() if k.startswith(fqn + ".")}
        if not torch.equal(dequantize_compressed(local, scheme), module.weight):
            raise PipelineError(f"export: {fqn} in {export_dir} does not decode to the variant's weights")
    for name, tensor in reference.state_dict().items():
        if name.rsplit(".", 1)[0] not in modules and name in tensors and not torch.equal(tensors[name], tensor):
            raise PipelineError(f"export: {name} in {export_dir} differs from the variant's")


# The stage -------------------------------------------------------------------------------------------------
def export_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, variant: str, metrics: dict,
                 params: ExportParams, tokenizer_dir: str | os.PathLike | None = None,
                 root: str | os.PathLike | None = None) -> Path:
    """Export the variant in `model_dir` to the HF directory `out_dir` (replaced atomically) and return it.

    `metrics` (from `evaluate_variant`) go into the model card. `tokenizer_dir`: the tokenizer to ship (e.g.
    the data directory's tokenizer/; default: the one saved in the variant directory). `root`: base of a
    relative `params.sources` (default: the current directory).
    """
    from transformers import AutoTokenizer

    model_dir, out = Path(model_dir), Path(out_dir)
    tok_dir = find_tokenizer(model_dir, tokenizer_dir)
    sources_text = None
    if params.sources is not None:
        sources = Path(params.sources)
        sources = sources if sources.is_absolute() or root is None else Path(root) / sources
        if not sources.is_file():
            raise PipelineError(f"export.sources: {sources} does not exist; point it at the corpus' SOURCES.md "
                                "or set it to null")
        sources_text = sources.read_text(encoding="utf-8")

    model = load_variant(model_dir, device="cpu", dtype="auto")
    method = variant_method(model)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        _set_generation_config(model, tokenizer)
        compressed = params.format == "compressed-tensors" and bool(quantized_modules(model))
        if compressed:
            export_compressed_tensors(model, tmp)  # model.safetensors + config.json
            model.generation_config.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)  # also writes generation_config.json
        tokenizer.save_pretrained(tmp)
        if params.remote_code:
            _add_auto_map(tmp)
        if sources_text is not None:
            (tmp / "DATA_SOURCES.md").write_text(sources_text, encoding="utf-8")
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        languages = sorted(k.removeprefix("ppl_") for k in metrics if k.startswith("ppl_"))
        card = model_card(name=f"{params.model_name}-{variant}", variant=variant, method=method,
                          metrics=metrics, config=config, params=params, sources_text=sources_text,
                          languages=languages)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if params.verify:
            verify_compressed_export(tmp, model) if compressed else verify_export(tmp, model)
        fsync_dir(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s (%s) to %s", variant, method, out)
    return out
