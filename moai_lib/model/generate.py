"""Batched text generation for prompts: left padding, pad-token fallback, completions only.

`greedy_decode` and `CudaGraphDecoder` are the lean decoding loop for speed (CUDA graphs around the step).

Left padding is exact for this model: padded positions are zeroed before the conv and the scan, so they
leave the recurrent state at zero and a padded prompt continues exactly as the unpadded one would
(`MambaMixer.forward`). The prompts are padded here by hand, so the tokenizer is never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .inputs import check_input_ids


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


# CUDA-graph decoding ------------------------------------------------------------------------------------------
def decode_logits(model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """One token after a prefill: input_ids (B, 1) → next-token logits (B, V) fp32; advances the cache's states
    (not its `seqlen_offset`). The model's forward minus its host-side input checks (a device sync each): the
    step `CudaGraphDecoder` captures. The LM head is called directly on the decoder's hidden state (no loss and
    no logits_to_keep handling to trace)."""
    backbone = model.backbone
    hidden = backbone.decode_step(backbone.embedding(input_ids[:, 0]), cache)  # (B, d)
    logits = model.lm_head(hidden).float()  # (B, V_padded)
    if logits.shape[-1] > model.config.vocab_size:  # padding rows are never predicted
        logits[:, model.config.vocab_size:] = torch.finfo(logits.dtype).min
    return logits


class CudaGraphDecoder:
    """The one-token decoding step of a `MoaiMambaForCausalLM`, captured once as a CUDA graph and replayed.

    Even fused (`decode_logits`: ~10 kernels per layer with the Triton backend), at small batch a step's launch
    cost exceeds its work (the CPU, not the GPU, sets the pace). Replaying the captured step is one launch per
    token, as mamba-ssm's `generate(cg=True)`. The graph reads the token ids from a static buffer, updates the
    cache's conv and SSM state tensors in place (their addresses are fixed for the cache's life) and writes the
    next-token logits (B, V) fp32 to a static buffer, returned by every call (overwritten by the next one: clone
    to keep them). It also holds the cache's A = -exp(A_log): re-capture after changing the weights.

    Build it after the prefill, on a CUDA model and its `MoaiMambaCache`; the warm-up steps it runs before the
    capture are undone, so the cache is left as it was. Methods that replace the cache tensors (beam search's
    `reorder_cache`) invalidate the graph. One capture serves every later prompt of the same batch size: `load`
    copies a new prefill's states into the graph's cache (mamba-ssm's `generate(cg=True)` likewise keeps its
    graph across calls); a capture costs tens of milliseconds, many decode steps.
    """

    def __init__(self, model, cache, warmup: int = 2):
        states = cache.conv_states + cache.ssm_states
        if not all(t.is_cuda for t in states):
            raise ValueError("CudaGraphDecoder needs the model and its cache on a CUDA GPU")
        self.model, self.cache = model, cache
        device = states[0].device
        self.input_ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        saved, offset = [t.clone() for t in states], cache.seqlen_offset
        cache.seqlen_offset = max(offset, 1)  # the mixers take their one-token path only after a prefill
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up outside the capture: Triton compiles, cuBLAS picks kernels
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        for t, s in zip(states, saved, strict=True):
            t.copy_(s)
        cache.seqlen_offset = offset

    def _step(self) -> torch.Tensor:
        return decode_logits(self.model, self.input_ids, self.cache)

    def load(self, cache) -> None:
        """Continue from `cache` (another prefill of the same model, same batch size) instead of the graph's own:
        its conv and SSM states are copied into the tensors the graph reads, and its position is taken over."""
        mine = self.cache.conv_states + self.cache.ssm_states
        theirs = cache.conv_states + cache.ssm_states
        if len(theirs) != len(mine) or any(a.shape != b.shape for a, b in zip(mine, theirs, strict=True)):
            raise ValueError(
                f"CudaGraphDecoder.load: the cache must come from the same model with batch size "
                f"{self.cache.batch_size} (got batch {cache.batch_size}, {len(cache.ssm_states)} layers); "
                f"capture a new CudaGraphDecoder for another batch size")
        torch._foreach_copy_(mine, theirs)
        self.cache.seqlen_offset = cache.seqlen_offset

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, 1) → next-token logits (B, V) fp32 (a static buffer); advances the cache by one."""
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        self.cache.seqlen_offset += 1
        return self.logits


class CudaGraphPrefill:
    """The prefill forward of prompts of one shape (batch, length), captured once as a CUDA graph and replayed.

    An eager prefill launches ~20 kernels per layer, each costing tens of µs of Python: at batch 1 and a 2K prompt
    the CPU sets the time to first token, not the GPU (BENCHMARKS.md). Replaying the captured forward is one launch.
    Under capture the scan splits a batch-narrow sequence over L from 2K tokens on (`triton_scan_seg`: twice the
    launches, half the GPU time, a loss only when launches cost Python time).

    `__call__(input_ids)` returns (logits (B, 1, V) of the last position, cache): both static, overwritten by the
    next replay. Take the first token from the logits and hand the cache to a `CudaGraphDecoder` (`load` copies
    the states) or decode from it directly before the next prefill. Build it on a CUDA model in eval mode; re-capture
    after changing the weights. One capture per prompt shape: a server keeps one per length bucket.
    """

    @torch.inference_mode()
    def __init__(self, model, batch_size: int, length: int, warmup: int = 2):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError("CudaGraphPrefill needs the model on a CUDA GPU; on the CPU run the prefill eagerly")
        if batch_size < 1 or length < 1:
            raise ValueError(f"CudaGraphPrefill: batch_size and length must be ≥ 1, got {batch_size}, {length}")
        from moai_lib.kernels.triton_scan_seg import graph_launches

        self.model, self.shape = model, (batch_size, length)
        self.input_ids = torch.zeros(batch_size, length, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with graph_launches():
            with torch.cuda.stream(stream):  # warm-up outside the capture: Triton compiles, cuBLAS picks kernels
                for _ in range(warmup):
                    self._forward()
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                out = self._forward()
        self.logits, self.cache = out.logits, out.cache
        self._offset = self.cache.seqlen_offset

    def _forward(self):
        return self.model(input_ids=self.input_ids, use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor):
        """input_ids (B, L) of the captured shape → (last-position logits (B, 1, V), cache)."""
        if tuple(input_ids.shape) != self.shape:
            raise ValueError(f"CudaGraphPrefill was captured for prompts of shape {self.shape}, got "
                             f"{tuple(input_ids.shape)}; capture one per prompt shape (or run this one eagerly)")
        check_input_ids(input_ids, self.model.get_input_embeddings().num_embeddings)  # the graph cannot check
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        self.cache.seqlen_offset = self._offset  # decoding from the cache directly moved it on
        return self.logits, self.cache


@torch.inference_mode()
def greedy_decode(model, input_ids: torch.Tensor, max_new_tokens: int, *,
                  cuda_graph: bool | CudaGraphDecoder = False,
                  prefill: CudaGraphPrefill | None = None) -> torch.Tensor:
    """Greedy continuation of `input_ids` (B, L) (no padding): the new tokens (B, max_new_tokens).

    The prompt runs as one full-sequence forward (the prefill), eagerly or as a replayed `CudaGraphPrefill`
    captured for this prompt shape (`prefill=`); each new token then runs the O(1) recurrent step, eagerly or,
    with `cuda_graph=True`, as a replayed `CudaGraphDecoder` captured for this call (same kernels, same tokens).
    Passing a `CudaGraphDecoder` of this model and batch size reuses it (`load`): no capture, as in a server
    decoding one prompt after another.
    """
    check_generation_args(max_new_tokens=max_new_tokens)
    if prefill is not None:
        logits, cache = prefill(input_ids)
    else:
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        logits, cache = out.logits, out.cache
    token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    if isinstance(cuda_graph, CudaGraphDecoder):
        cuda_graph.load(cache)
        step = cuda_graph
    elif cuda_graph:
        step = CudaGraphDecoder(model, cache)
    else:
        def step(ids):
            return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    tokens = [token]
    for _ in range(max_new_tokens - 1):
        token = step(token).argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=1)
