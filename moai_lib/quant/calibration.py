"""Block-sequential calibration shared by GPTQ and AWQ.

prepare: a forward pre-hook on `backbone.layers[0]` records the block-0 inputs (the embeddings, B×L×d, and
the attention mask) of every forward pass the user runs on calibration batches.

convert (`run_sequential`): for each block in order, and inside it for each target linear in the order the
forward pass calls them (in_proj, x_proj, out_proj, fc1, fc2), the block is run on the recorded inputs up to
that layer (a pre-hook collects its inputs and stops the pass), the method quantizes the layer from what it
collected, and the quantized layer replaces it, so the next layer's inputs already pass through the quantized
ones (GPTQ's "true sequential"). The block's outputs, computed with all its layers quantized, are the next
block's inputs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .api import QuantConfig, QuantizationError, quantize_, set_submodule

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a collecting hook once the layer of interest has seen its input."""


def _blocks(model: nn.Module, method: str) -> nn.ModuleList:
    layers = getattr(getattr(model, "backbone", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise QuantizationError(f"{method}: calibration needs a MoaiMamba model (model.backbone.layers), got "
                                f"{type(model).__name__}")
    return layers


def check_targets_in_blocks(model: nn.Module, config: QuantConfig, targets: Iterable[str]) -> None:
    """Calibrated methods see only the blocks' inputs: every target must sit inside backbone.layers."""
    _blocks(model, config.method)
    outside = [fqn for fqn in targets if not fqn.startswith("backbone.layers.")]
    if outside:
        raise QuantizationError(
            f"{config.method}: calibrates layers inside backbone.layers only, but filter_fn selected "
            f"{', '.join(outside)}; quantize those with IntWeightOnlyConfig (RTN) in a second quantize_ call"
        )


@dataclass
class Capture:
    """Block-0 inputs recorded between prepare and convert."""

    targets: list[str]
    inputs: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    handle: torch.utils.hooks.RemovableHandle | None = None


def start_capture(model: nn.Module, config: QuantConfig, targets: Iterable[str]) -> Capture:
    capture = Capture(targets=list(targets))

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        capture.inputs.append((hidden.detach(), kwargs.get("attention_mask")))

    capture.handle = _blocks(model, config.method)[0].register_forward_pre_hook(hook, with_kwargs=True)
    return capture


def _call_order(block: nn.Module, names: list[str], sample: tuple[torch.Tensor, torch.Tensor | None]) -> list[str]:
    """`names` (sub-module names inside `block`) sorted by when the block's forward calls them."""
    order: list[str] = []
    handles = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: order.append(n)) for n in names]
    try:
        with torch.no_grad():
            block(sample[0], attention_mask=sample[1])
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in order]
    if missing:
        raise QuantizationError(f"calibration: layers {missing} are never called by the block's forward")
    return list(dict.fromkeys(order))


class LayerQuantizer:
    """What a calibrated method provides: `collect(x)` per input batch (x: (tokens, in)), then `finish(block,
    name, linear)` returns the quantized module (it may also adjust the block, e.g. fold AWQ scales)."""

    def collect(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self, block: nn.Module, name: str, linear: nn.Linear) -> nn.Module:
        raise NotImplementedError


def run_sequential(model: nn.Module, config: QuantConfig, capture: Capture,
                   make_quantizer: Callable[[str, nn.Linear], LayerQuantizer]) -> dict[str, nn.Module]:
    """Quantize `capture.targets` block by block, layer by layer (see the module docstring)."""
    if capture.handle is not None:
        capture.handle.remove()
        capture.handle = None
    if not capture.inputs:
        raise QuantizationError(
            f"{config.method}: no calibration batches were seen between prepare and convert; run "
            "model(input_ids) on calibration data (e.g. 128 × 2048 tokens of training text) before convert"
        )
    inputs = capture.inputs
    targets = set(capture.targets)
    done: dict[str, nn.Module] = {}
    for i, block in enumerate(_blocks(model, config.method)):
        prefix = f"backbone.layers.{i}."
        names = [fqn.removeprefix(prefix) for fqn in capture.targets if fqn.startswith(prefix)]
        for name in _call_order(block, names, inputs[0]) if names else []:
            linear = block.get_submodule(name)
            quantizer = make_quantizer(prefix + name, linear)

            def hook(module, args, quantizer=quantizer):
                x = args[0]
                quantizer.collect(x.detach().reshape(-1, x.shape[-1]))
                raise _StopForward

            handle = linear.register_forward_pre_hook(hook)
            try:
                with torch.no_grad():
                    for hidden, mask in inputs:
                        try:
                            block(hidden, attention_mask=mask)
                        except _StopForward:
                            pass
            finally:
                handle.remove()
            new = quantizer.finish(block, name, linear)
            set_submodule(block, name, new)
            done[prefix + name] = new
            logger.info("%s: quantized %s", config.method, prefix + name)
        if len(done) == len(targets):
            break
        with torch.no_grad():
            inputs = [(block(hidden, attention_mask=mask), mask) for hidden, mask in inputs]
    return done


def check_calib_data(model: nn.Module, calib_data, method: str, batch_size: int = 8) -> list[torch.Tensor]:
    """Validate token ids for a compatibility function and split them into batches (B, L).

    calib_data: a LongTensor (N, L) or (L,), or a list of such tensors.
    """
    items = list(calib_data) if isinstance(calib_data, list | tuple) else [calib_data]
    if not items:
        raise QuantizationError(f"{method}: calib_data is empty; pass token ids (N, L) from the model's tokenizer")
    vocab = model.config.vocab_size
    batches = []
    for k, t in enumerate(items):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise QuantizationError(f"{method}: calib_data[{k}] must be an integer tensor of token ids (N, L), got "
                                    f"{type(t).__name__}" + (f" of {t.dtype}" if isinstance(t, torch.Tensor) else ""))
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[1] == 0:
            raise QuantizationError(f"{method}: calib_data[{k}] has shape {tuple(t.shape)}; expected token ids "
                                    "(N, L) or (L,) with L > 0")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= vocab:
            bad = hi if hi >= vocab else lo
            raise QuantizationError(
                f"{method}: calibration token id {bad} is outside the model's vocabulary [0, {vocab}); tokenize the "
                "calibration text with the model's own tokenizer"
            )
        batches.extend(t.split(batch_size))
    return batches


def calibrate(model: nn.Module, config: QuantConfig, calib_data) -> nn.Module:
    """prepare → forward every calibration batch → convert, for the compatibility functions."""
    batches = check_calib_data(model, calib_data, config.method)
    quantize_(model, config)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            model(batch.to(device), use_cache=False)
    model.train(was_training)
    return quantize_(model, dataclasses.replace(config, step="convert"))
