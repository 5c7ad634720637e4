"""The evaluate stage: one model variant → flat metrics (perplexity, size, bits/weight, speed, peak memory).

    metrics = evaluate_variant("outputs/models/quantized/gptq", "outputs/data", EvaluateParams(), variant="gptq")

What each number means:
- `nll`, `ppl`: mean next-token negative log-likelihood (nats) over the validation split and exp of it, from
  `moai_lib.train.evaluate.evaluate` (each sequence predicts its tokens 1..L-1; at most `max_batches` batches
  spread evenly over the split). `nll_<lang>`, `ppl_<lang>`: the same per language. The packer fills every
  block from documents of one language (`moai_lib.data.packing`) and the shards record each block's language
  (`<split>.langs.npy`), and evaluation batches never mix languages, so the per-language figures are exact
  token-level means, not approximations. Shards without language info give only the overall figures.
- `size_bytes`, `size_mb`: bytes of the weight files in the variant directory (`*.safetensors`,
  `pytorch_model*.bin`), as they sit on disk (MB = 10^6 bytes).
- `bits_per_weight`: storage bits per weight of the layers the quantization policy targets (in_proj, x_proj,
  out_proj, fc1, fc2): for quantized layers everything their state holds (packed integers, scales, zero points,
  run-time input scales; as `moai_lib.quant.storage_summary`, but counted from the stored tensors, so the
  figure describes the checkpoint whatever dtype it is evaluated in); for an unquantized model the stored
  dtype of those same layers (32 for fp32, 16 for bf16), so that the figure compares across variants.
  `model_bits_per_weight`: 8 · (bytes of the whole state dict, tied tensors once) / logical parameters (a
  quantized layer counts its in·out weights), i.e. the average over everything the model stores.
- `prefill_tok_s`: `speed_batch_size` · `prefill_len` / the median time of one prefill forward (with the
  recurrent cache, logits of the last position only). `decode_tok_s`: `speed_batch_size` · `decode_tokens` /
  the median time of `decode_tokens` greedy O(1) recurrent steps continuing that prefill (one token per step
  through `MambaMixer._step` and the cache; LM head and argmax included). `warmup` untimed runs first, then
  `repeats` timed ones. Token ids are random (speed does not depend on them).
- `peak_mem_mb`: on CUDA, `torch.cuda.max_memory_allocated` over the whole evaluation (load, perplexity and
  speed), in MB (10^6 bytes). On CPU, the growth of the process's peak resident set size over the evaluation:
  VmHWM − VmRSS at the start, with VmHWM reset through /proc/self/clear_refs (Linux); where that file is not
  writable, ru_maxrss − VmRSS at the start (a lower bound when the process peaked earlier). It counts
  everything the process touched (weights, activations, allocator caches, lazily imported code), so compare
  it between variants evaluated the same way, not with the CUDA figure.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.corpus import DataError
from ..data.shards import PackedDataset
from ..errors import check_integer
from ..quant import DEFAULT_QUANTIZED_LAYERS
from ..train.evaluate import evaluate
from .errors import PipelineError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILE_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# What bitsandbytes variants were before their layers were stored: a float model directory plus this file,
# quantized at load time. Loading one would silently evaluate the float model, so it is refused.
OLD_BNB_VARIANT_FILE = "quantize_on_load.json"
MB = 1e6


@dataclass
class EvaluateParams:
    """Parameters of the evaluate stage (one section of params.yaml).

    Args:
        max_batches: perplexity over at most this many batches, spread evenly over the validation split
            (None: the whole split).
        batch_size: sequences per perplexity batch.
        seq_len: tokens per perplexity sequence; must divide the shards' block size (None: the block size).
        prefill_len: prompt length of the speed test.
        decode_tokens: tokens generated one by one after the prefill in the speed test.
        speed_batch_size: sequences decoded together in the speed test.
        warmup: untimed runs before the timed ones (kernel selection, allocator warm-up).
        repeats: timed runs; the median is reported.
        device: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
        dtype: activation/weight dtype the model is loaded in: "auto" (bfloat16 on CUDA, float32 on CPU),
            "float32", "bfloat16" or "float16". Quantized layers keep their storage; only their scales and the
            high-precision layers take this dtype.
        seed: seeds the random token ids of the speed test.
    """

    max_batches: int | None = 50
    batch_size: int = 8
    seq_len: int | None = None
    prefill_len: int = 256
    decode_tokens: int = 64
    speed_batch_size: int = 1
    warmup: int = 1
    repeats: int = 3
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0

    def __post_init__(self):
        def integer(name: str, minimum: int, optional: bool = False) -> None:
            check_integer(getattr(self, name), f"evaluate.{name}", minimum, PipelineError, optional=optional,
                          none_word="null")

        integer("max_batches", 1, optional=True)
        integer("batch_size", 1)
        integer("seq_len", 2, optional=True)
        integer("prefill_len", 1)
        integer("decode_tokens", 1)
        integer("speed_batch_size", 1)
        integer("warmup", 0)
        integer("repeats", 1)
        integer("seed", 0)
        if self.device not in DEVICES:
            raise PipelineError(f"evaluate.device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise PipelineError(f"evaluate.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> EvaluateParams:
        """Build from the `evaluate:` section of a params file; an unknown key is an error naming it."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PipelineError(f"unknown parameter(s) {', '.join(f'evaluate.{k}' for k in unknown)}; valid: "
                                f"{', '.join(sorted(known))}")
        return cls(**data)


# Loading ---------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """"auto" → cuda when available, else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("evaluate.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = DTYPES[name]
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The weight files of a model directory (safetensors shards or PyTorch .bin files)."""
    directory = Path(model_dir)
    return sorted({p for pattern in WEIGHT_FILE_PATTERNS for p in directory.glob(pattern) if p.is_file()})


def load_variant(model_dir: str | os.PathLike, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype | str | None = "auto") -> nn.Module:
    """Load any variant directory in eval mode: a plain HF model dir or a quantized one (moai format:
    RTN, QAT-converted, GPTQ, AWQ, FP8, FP4, bitsandbytes NF4/FP4/INT8). `dtype="auto"` keeps the checkpoint's
    dtype."""
    from transformers import AutoModelForCausalLM

    directory = Path(model_dir)
    if not (directory / "config.json").is_file():
        raise PipelineError(f"{directory} is not a model directory (no config.json); run the stage that writes it")
    if not weight_files(directory):
        raise PipelineError(f"{directory} holds no weight files ({', '.join(WEIGHT_FILE_PATTERNS)})")
    if (directory / OLD_BNB_VARIANT_FILE).is_file():
        raise PipelineError(f"{directory} is a bitsandbytes variant in the old format (a float model plus "
                            f"{OLD_BNB_VARIANT_FILE}, quantized at load time), which is no longer read; re-run "
                            f"its quantize stage (`moai stage quantize --method {directory.name}` or `dvc repro "
                            f"quantize@{directory.name}`), which now saves the quantized layers")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    model.to(device)
    return model.eval()


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Names of the layers recorded as quantized in `model.config.quantization_config`."""
    qc = getattr(model.config, "quantization_config", None)
    return sorted({fqn for entry in getattr(qc, "methods", []) for fqn in entry["modules"]})


def variant_method(model: nn.Module) -> str:
    """The quantization method(s) recorded in the model ("rtn", "gptq", "qat", ...; "+"-joined when several
    were applied), or "none" for an unquantized model."""
    qc = getattr(model.config, "quantization_config", None)
    names = list(dict.fromkeys(entry["method"] for entry in getattr(qc, "methods", [])))
    return "+".join(names) if names else "none"


# Storage ---------------------------------------------------------------------------------------------------
def safetensors_entries(model_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """{tensor name: (bytes, elements)} of every safetensors file in `model_dir`, read from the file headers
    (8-byte little-endian header length, then a JSON header), without loading any tensor."""
    entries = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                entries[name] = (end - start, math.prod(info["shape"]))
    return entries


def storage_metrics(model: nn.Module, model_dir: str | os.PathLike) -> dict[str, float]:
    """size_bytes, size_mb (weight files on disk), bits_per_weight (targeted layers), model_bits_per_weight,
    params (logical parameters), quantized_layers (see the module docstring).

    Byte counts come from the stored tensors (safetensors headers), so they describe the checkpoint whatever
    dtype it was loaded in; .bin checkpoints are measured in memory."""
    size = sum(p.stat().st_size for p in weight_files(model_dir))
    qnames = set(quantized_layer_names(model))
    n_params = logical_params(model)
    entries = safetensors_entries(model_dir)
    if not entries:
        entries = {name: (t.numel() * t.element_size(), t.numel()) for name, t in _unique_tensors(model)}
    if qnames:
        weights = sum(model.get_submodule(fqn).in_features * model.get_submodule(fqn).out_features
                      for fqn in qnames)
        stored = sum(b for name, (b, _) in entries.items() if _owned_by(name, qnames))
    else:
        targeted = [(b, n) for name, (b, n) in entries.items() if name.endswith(".weight")
                    and name.rsplit(".", 2)[-2] in DEFAULT_QUANTIZED_LAYERS]
        weights, stored = sum(n for _, n in targeted), sum(b for b, _ in targeted)
    model_bytes = sum(b for b, _ in entries.values())
    return {"size_bytes": size, "size_mb": size / MB,
            "bits_per_weight": 8 * stored / weights if weights else float("nan"),
            "model_bits_per_weight": 8 * model_bytes / n_params, "params": n_params,
            "quantized_layers": len(qnames)}


def _owned_by(name: str, modules: set[str] | list[str]) -> bool:
    """Whether tensor `name` belongs to one of `modules` (a quantized layer's buffers, e.g. `...in_proj.scales` or
    bitsandbytes' `...in_proj.weight_absmax`)."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


def _unique_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The state dict with tied tensors once (as save_pretrained stores them)."""
    seen, out = set(), []
    for name, t in model.state_dict().items():
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out.append((name, t))
    return out


def logical_params(model: nn.Module) -> int:
    """Parameters of the float architecture: a quantized layer counts in·out (+ bias), tied weights once."""
    qnames = set(quantized_layer_names(model))
    total = 0
    for fqn in qnames:
        module = model.get_submodule(fqn)
        total += module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
    seen = set()
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[0] in qnames or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


# Speed and memory ------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_speed(model: nn.Module, params: EvaluateParams, device: torch.device) -> dict[str, float]:
    """prefill_tok_s and decode_tok_s (with their median times in ms): see the module docstring."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(params.seed)
    ids = torch.randint(0, vocab, (params.speed_batch_size, params.prefill_len), generator=gen).to(device)
    prefill_s, decode_s = [], []
    for run in range(params.warmup + params.repeats):
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        _sync(device)
        middle = time.perf_counter()
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        for _ in range(params.decode_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        end = time.perf_counter()
        if run >= params.warmup:
            prefill_s.append(middle - start)
            decode_s.append(end - middle)
    prefill, decode = statistics.median(prefill_s), statistics.median(decode_s)
    return {"prefill_tok_s": params.speed_batch_size * params.prefill_len / prefill,
            "decode_tok_s": params.speed_batch_size * params.decode_tokens / decode,
            "prefill_ms": 1e3 * prefill, "decode_ms_per_token": 1e3 * decode / params.decode_tokens}


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory over a `with` block of work on `device`: `.peak_mb` after the block, in MB (see the module
    docstring for what it means)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.start_kb = _proc_status_kb("VmRSS") or 0
        self.hwm_reset = False
        if os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK):
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM (peak RSS) to the current RSS (Linux ≥ 4.0)
                self.hwm_reset = True
            except OSError:
                logger.warning("cannot reset the peak RSS; peak_mem_mb falls back to ru_maxrss")
        return self

    def __exit__(self, *exc) -> None:
        self.peak_mb = self._peak_mb()

    def _peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MB
        peak_kb = _proc_status_kb("VmHWM") if self.hwm_reset else None
        if peak_kb is None:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
            if sys.platform == "darwin":
                peak_kb //= 1024  # bytes on macOS
        return max(peak_kb - self.start_kb, 0) * 1024 / MB


# The stage -------------------------------------------------------------------------------------------------
def evaluate_variant(model_dir: str | os.PathLike, data_dir: str | os.PathLike, params: EvaluateParams, *,
                     variant: str) -> dict[str, Any]:
    """Evaluate one variant directory on the validation split of `data_dir` (see the module docstring).

    Returns flat metrics: ppl, nll, ppl_<lang>, nll_<lang>, eval_tokens, size_bytes, size_mb,
    bits_per_weight, model_bits_per_weight, params, quantized_layers, prefill_tok_s, decode_tok_s,
    prefill_ms, decode_ms_per_token, peak_mem_mb, eval_seconds (numbers), and the strings "variant",
    "method" and "device".
    """
    device = resolve_device(params.device)
    dtype = resolve_dtype(params.dtype, device)
    try:
        valid = PackedDataset(data_dir, "valid", seq_len=params.seq_len)
    except DataError as exc:
        param = "evaluate.seq_len" if "max_length" in str(exc) else "evaluate (data)"
        raise PipelineError(f"{param}: {exc}") from None
    started = time.perf_counter()
    with PeakMemory(device) as memory:
        model = load_variant(model_dir, device=device, dtype=dtype)
        if model.config.vocab_size < valid.vocab_size:
            raise PipelineError(f"{model_dir}: the model's vocab_size {model.config.vocab_size} is smaller than the "
                                f"data's {valid.vocab_size}: the variant was not trained on {data_dir}")
        ppl = evaluate(model, valid, params.batch_size, params.max_batches)
        speed = measure_speed(model, params, device)
    metrics: dict[str, Any] = {"variant": variant, "method": variant_method(model), "device": device.type,
                               "nll": ppl["val_loss"], "ppl": ppl["val_ppl"], "eval_tokens": ppl["val_tokens"]}
    for lang in valid.languages:
        if f"val_loss_{lang}" in ppl:
            metrics[f"nll_{lang}"] = ppl[f"val_loss_{lang}"]
            metrics[f"ppl_{lang}"] = ppl[f"val_ppl_{lang}"]
    metrics.update(storage_metrics(model, model_dir))
    metrics.update(speed)
    metrics["peak_mem_mb"] = memory.peak_mb
    metrics["eval_seconds"] = time.perf_counter() - started
    if not math.isfinite(metrics["ppl"]):
        logger.warning("%s: perplexity is not finite (%s)", variant, metrics["ppl"])
    logger.info("evaluate %s: ppl %.3f, %.2f bits/weight, %.1f MB, prefill %.0f tok/s, decode %.0f tok/s",
                variant, metrics["ppl"], metrics["bits_per_weight"], metrics["size_mb"], metrics["prefill_tok_s"],
                metrics["decode_tok_s"])
    return metrics
