"""Batched text generation for prompts: left padding, pad-token fallback, completions only.

Left padding is exact for this model: padded positions are zeroed before the conv and the scan, so they
leave the recurrent state at zero and a padded prompt continues exactly as the unpadded one would
(`MambaMixer.forward`). The prompts are padded here by hand, so the tokenizer is never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Completion:
    prompt: str
    completion: str  # the generated text only, special tokens removed, cut at the first eos
    num_new_tokens: int  # generated tokens, counting the eos that ended it (if any), not padding


def check_generation_args(*, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                          top_k: int = 50, top_p: float = 1.0, repetition_penalty: float = 1.0,
                          batch_size: int | None = None) -> None:
    """Raise ValueError naming the first invalid sampling argument and what would be valid."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}; use greedy decoding "
                         "(do_sample=False, --greedy) for deterministic output")
    if top_k < 0:
        raise ValueError(f"top_k must be ≥ 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 disables it), got {repetition_penalty}")
    if batch_size is not None and batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")


def _pad_left(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → input_ids, attention_mask (B, L), padded on the left."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, length - len(seq):] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.inference_mode()
def generate_completions(
    model, tokenizer, prompts: str | Sequence[str], *, max_new_tokens: int = 64, do_sample: bool = False,
    temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, repetition_penalty: float = 1.0,
    batch_size: int | None = None, streamer=None, add_special_tokens: bool = True,
) -> list[Completion]:
    """Generate a continuation of each prompt, `batch_size` prompts per `model.generate` call.

    The pad token is the tokenizer's pad token, else its eos token (else id 0: padded positions are masked
    and, without an eos, no finished sequence needs padding). Sampling seeds come from torch's global RNG.
    `streamer` (e.g. `transformers.TextStreamer`) needs a single prompt.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    check_generation_args(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                          top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, batch_size=batch_size)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt {i} is empty; every prompt needs some text")
    if streamer is not None and len(prompts) != 1:
        raise ValueError(f"a streamer needs exactly one prompt, got {len(prompts)}")
    eos_id = tokenizer.eos_token_id
    pad_id = next((i for i in (tokenizer.pad_token_id, eos_id) if i is not None), 0)
    options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, repetition_penalty=repetition_penalty,
                   pad_token_id=pad_id)
    if do_sample:  # HF warns about sampling flags given to greedy decoding
        options.update(temperature=temperature, top_k=top_k, top_p=top_p)
    if eos_id is not None:
        options["eos_token_id"] = eos_id

    results: list[Completion] = []
    step = batch_size or len(prompts)
    for start in range(0, len(prompts), step):
        batch = prompts[start:start + step]
        encoded = tokenizer(batch, add_special_tokens=add_special_tokens)["input_ids"]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {start + i} encodes to no tokens")
        input_ids, attention_mask = _pad_left(encoded, pad_id, model.device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer, **options)
        for prompt, new_ids in zip(batch, output[:, input_ids.shape[1]:].tolist(), strict=True):
            # Finished rows are padded after their eos: keep what precedes the first eos.
            stop = new_ids.index(eos_id) if eos_id is not None and eos_id in new_ids else len(new_ids)
            text = tokenizer.decode(new_ids[:stop], skip_special_tokens=True)
            results.append(Completion(prompt, text, min(stop + 1, len(new_ids))))
    return results


def generate_text(model, tokenizer, prompts: str | Sequence[str], **sampling) -> list[str]:
    """The completions (generated text only) of `prompts`; `sampling` as in `generate_completions`."""
    return [c.completion for c in generate_completions(model, tokenizer, prompts, **sampling)]
