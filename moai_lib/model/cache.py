"""The recurrent decoding cache: per layer, the last W-1 conv inputs and the fp32 SSM state.

Its size is fixed by (batch, layers, d_inner, N, W) and never grows with the context: this is what makes
Mamba decoding O(1) per token. It speaks the small part of HF's `Cache` protocol that `generate` uses
(`get_seq_length`, `is_linear`, beam reordering and batch selection).
"""

from __future__ import annotations

import torch


class MoaiMambaCache:
    """Conv and SSM states of every layer.

    conv_states[i]: (B, D, W-1) in the model dtype: the last W-1 inputs of layer i's causal conv.
    ssm_states[i]:  (B, D, N) fp32: layer i's recurrent state h_t.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config, batch_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        self.config = config
        self.batch_size = batch_size
        self.dtype = dtype
        d_inner, width, state = config.d_inner, config.conv_kernel_size, config.state_size
        self.conv_states = [
            torch.zeros(batch_size, d_inner, width - 1, dtype=dtype, device=device)
            for _ in range(config.num_hidden_layers)
        ]
        self.ssm_states = [
            torch.zeros(batch_size, d_inner, state, dtype=torch.float32, device=device)
            for _ in range(config.num_hidden_layers)
        ]
        self.seqlen_offset = 0  # tokens consumed so far; 0 means the next forward is a prefill
        # Per layer: (key of A_log's storage and version, A = -exp(A_log) fp32 (D, N)): computed once per decoding
        # session instead of two kernels per layer per token; recomputed when A_log changes (see `decode_A`).
        self._decode_A: dict[int, tuple[tuple, torch.Tensor]] = {}

    def decode_A(self, layer_idx: int, A_log: torch.Tensor) -> torch.Tensor:
        """A = -exp(A_log) (D, N) fp32 for layer `layer_idx`'s decode step, cached while A_log is unchanged (same
        storage, same version counter: an optimizer step or `load_state_dict` in place bumps the version).
        A CUDA graph captured over the step holds the cached tensor: re-capture after changing the weights."""
        key = (A_log.device, A_log.data_ptr(), -1 if A_log.is_inference() else A_log._version)
        hit = self._decode_A.get(layer_idx)
        if hit is None or hit[0] != key:
            hit = (key, -torch.exp(A_log.detach().float()))
            self._decode_A[layer_idx] = hit
        return hit[1]

    # --- the part of HF's Cache protocol used by `generate` --------------------------------------------------
    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self.ssm_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seqlen_offset

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        for t in self.conv_states + self.ssm_states:
            t.zero_()
        self.seqlen_offset = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search)."""
        self.conv_states = [t.index_select(0, beam_idx.to(t.device)) for t in self.conv_states]
        self.ssm_states = [t.index_select(0, beam_idx.to(t.device)) for t in self.ssm_states]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)
        self.batch_size = self.ssm_states[0].shape[0]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.conv_states = [t.repeat_interleave(repeats, dim=0) for t in self.conv_states]
        self.ssm_states = [t.repeat_interleave(repeats, dim=0) for t in self.ssm_states]
        self.batch_size *= repeats

    # --- sizes --------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by the cache (independent of the number of tokens consumed)."""
        return sum(t.numel() * t.element_size() for t in self.conv_states + self.ssm_states)

    def __repr__(self) -> str:
        return (f"MoaiMambaCache(layers={len(self.ssm_states)}, batch={self.batch_size}, "
                f"seqlen_offset={self.seqlen_offset}, bytes={self.nbytes()})")
