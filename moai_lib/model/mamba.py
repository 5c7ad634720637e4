"""The MOAI pure-Mamba causal LM, top to bottom in one file.

    input_ids (B, L)
      → backbone.embedding                                   (B, L, d)
      → N × MambaBlock:  h = h + mixer(norm(h));  h = h + mlp(norm2(h))   (MLP omitted if intermediate_size = 0)
      → backbone.norm_f → lm_head                            (B, L, V)

Parameter names follow state-spaces/mamba (`backbone.layers.{i}.mixer.in_proj`, `...norm2`, `...mlp.fc1`,
`backbone.norm_f`, `lm_head`), so its checkpoints load without renaming. The mixer is Mamba-1 (S6):

    [x; z] = in_proj(u)                    x, z: (B, E, L), E = expand·d
    x = silu(causal_conv1d(x))
    [dt; B; C] = x_proj(x)                  dt: (B, L, R), B, C: (B, L, N)
    Δ = softplus(dt_proj(dt))              (bias inside the softplus)
    y = selective_scan(x, Δ, A = -exp(A_log), B, C, D) · silu(z)
    out = out_proj(y)

A_log, D and the recurrent state are kept in fp32 whatever the model dtype. The full-sequence path keeps every
activation in (B, L, ·) memory and hands the conv and the scan (B, ·, L) views of it (channels-last); the Triton
backend reads those in place and returns outputs and gradients in that layout, so no transposed copy is made in
the forward or the backward (`kernels/triton_scan.py`, `kernels/triton_conv.py`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from ..config import MoaiMambaConfig
from ..kernels import dispatch
from .cache import MoaiMambaCache
from .inputs import check_input_ids
from .loss import lm_head_outputs


def _use_triton(config: MoaiMambaConfig, device: torch.device) -> bool:
    """Whether the block's glue (norms, SiLU·mul) runs as Triton kernels: when the scan backend resolves to
    triton for `device` (CUDA, or the CPU under TRITON_INTERPRET=1 with backend 'triton')."""
    return _resolved_backend(config.kernel_backend if config.use_fast_scan else "reference", device) == "triton"


@functools.lru_cache(maxsize=64)
def _resolved_backend(backend: str, device: torch.device) -> str:
    return dispatch.resolve_backend(backend, device)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight, computed in fp32, returned in the weight's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(self.weight.dtype)

    def add_norm(self, x: torch.Tensor | None, residual: torch.Tensor,
                 fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x); x None: (norm(residual), residual). `fused`: one Triton kernel
        (`kernels.triton_norm`, differentiable), else this module's torch ops (the same expressions)."""
        if fused:
            from ..kernels.triton_norm import add_rms_norm_triton

            return add_rms_norm_triton(x, residual, self.weight, self.eps)
        residual = residual if x is None else residual + x
        return self(residual), residual

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MambaMixer(nn.Module):
    """The selective SSM mixer (Mamba-1), with a full-sequence path and a one-token decode path."""

    def __init__(self, config: MoaiMambaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        d, E, N, R, W = (config.hidden_size, config.d_inner, config.state_size, config.time_step_rank,
                         config.conv_kernel_size)
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = E, N, R, W
        self.in_proj = nn.Linear(d, 2 * E, bias=config.use_bias)
        self.conv1d = nn.Conv1d(E, E, kernel_size=W, groups=E, padding=W - 1, bias=config.use_conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        # S4D-real init (A = -(1..N)), kept in fp32: exp(Δ·A) is sensitive to A's precision.
        self.A_log = nn.Parameter(torch.empty(E, N, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(E, dtype=torch.float32))
        self.out_proj = nn.Linear(E, d, bias=config.use_bias)
        # Conventions read by the optimizer setup (state-spaces/mamba): no weight decay on these.
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` must not round A_log and D: exp(Δ·A) and the D skip are precision-sensitive
        # (state-spaces/mamba keeps them fp32 too). Device moves still apply.
        super()._apply(fn, recurse)
        for p in (self.A_log, self.D):
            if p.dtype != torch.float32 and p.is_floating_point():
                p.data = p.data.float()
        return self

    @property
    def backend(self) -> str:
        return self.config.kernel_backend if self.config.use_fast_scan else "reference"

    def forward(self, hidden_states: torch.Tensor, cache: MoaiMambaCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (B, L, d) → (B, L, d). `attention_mask` (B, L) zeroes padded positions so they
        leave the recurrent state untouched (left padding then gives exactly the unpadded result)."""
        batch, length, _ = hidden_states.shape
        if cache is not None and cache.seqlen_offset > 0 and length == 1:
            return self._step(hidden_states, cache)
        if attention_mask is not None:
            hidden_states = hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)
        backend = _resolved_backend(self.backend, hidden_states.device)
        # Channels-last: x, z, Δ, B, C and y are (B, ·, L) views of (B, L, ·) memory. The Triton conv and scan read
        # such views in place and return outputs and gradients in that layout, so x_proj and out_proj consume them
        # without transposed copies (benchmarks/BENCHMARKS.md §3: ~31% of a training step was such copies).
        xz = self.in_proj(hidden_states)  # (B, L, 2E)
        x, z = (t.transpose(1, 2) for t in xz.chunk(2, dim=-1))  # (B, E, L) views
        A = -torch.exp(self.A_log.float())  # (E, N)
        continuing = cache is not None and cache.seqlen_offset > 0
        conv_out = dispatch.causal_conv1d(
            x, self.conv1d.weight.squeeze(1), self.conv1d.bias,
            initial_states=cache.conv_states[self.layer_idx] if continuing else None,
            return_final_states=cache is not None, activation="silu", backend=backend,
        )
        if cache is not None:
            x, conv_state = conv_out
            cache.conv_states[self.layer_idx].copy_(conv_state)
        else:
            x = conv_out  # (B, E, L); channels-last from the Triton conv, contiguous from torch's
        if attention_mask is not None:
            x = x * attention_mask[:, None, :].to(x.dtype)
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, E, L); bias goes inside the softplus
        B, C = B.transpose(1, 2), C.transpose(1, 2)  # (B, N, L) views of x_dbl's columns
        if backend != "triton":  # the other scans read B and C as contiguous (B, N, L)
            B, C = B.contiguous(), C.contiguous()
        scan = dispatch.selective_scan(
            x, dt, A, B, C, self.D.float(), z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, return_last_state=cache is not None,
            initial_state=cache.ssm_states[self.layer_idx] if continuing else None,
            # mamba-ssm's scan takes no initial state: continue a cached scan with the torch path instead.
            backend="torch" if continuing and backend == "mamba_ssm" else backend,
            checkpoint_every=self.config.scan_checkpoint_every,
            # dt is dt_proj's output and y's gradient comes from out_proj: nothing else reads either, so the
            # backward may write d(dt) and du over them (two fewer (B, E, L) tensors at its peak).
            grad_in_place=True,
        )
        if cache is not None:
            y, last_state = scan
            cache.ssm_states[self.layer_idx].copy_(last_state)
        else:
            y = scan
        y = y.transpose(1, 2)  # (B, L, E): a view of the Triton scan's output, no copy
        if not torch.is_autocast_enabled(y.device.type):
            y = y.to(hidden_states.dtype)  # (under autocast out_proj casts y itself: no fp32 round trip)
        return self.out_proj(y)  # (B, L, d)

    def _step(self, hidden_states: torch.Tensor, cache: MoaiMambaCache) -> torch.Tensor:
        """`step` for a (B, 1, d) input (the forward's one-token path)."""
        return self.step(hidden_states[:, 0], cache)[:, None]

    def step(self, u: torch.Tensor, cache: MoaiMambaCache) -> torch.Tensor:
        """One decoding step, O(1) in the context length: u (B, d) → (B, d); updates the cache's states in place.

        With the Triton backend this is five launches: in_proj, the conv step (+SiLU), x_proj, one fused kernel
        for Δ = softplus(dt_proj(dt) + bias), the state update, the D skip and the SiLU(z) gate
        (`ssm_step_triton`), and out_proj. A = -exp(A_log) comes from the cache (computed once per session).
        """
        E = self.d_inner
        xz = self.in_proj(u)  # (B, 2E)
        x, z = xz[:, :E], xz[:, E:]  # strided views: the kernels take strides
        backend = _resolved_backend(self.backend, u.device)
        x = dispatch.causal_conv1d_update(x, cache.conv_states[self.layer_idx], self.conv1d.weight.squeeze(1),
                                          self.conv1d.bias, activation="silu", backend=backend)
        x_dbl = self.x_proj(x)  # (B, R + 2N)
        A = cache.decode_A(self.layer_idx, self.A_log)
        state = cache.ssm_states[self.layer_idx]
        if backend == "triton" and isinstance(self.dt_proj, nn.Linear):
            from ..kernels.triton_decode import ssm_step_triton

            y = ssm_step_triton(state, x, x_dbl, self.dt_proj.weight, self.dt_proj.bias, A, self.D, z)
        else:
            dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
            dt = F.linear(dt, self.dt_proj.weight)  # (B, E); bias goes inside the softplus
            y = dispatch.selective_state_update(state, x, dt, A, B, C, self.D, z=z, dt_bias=self.dt_proj.bias,
                                                dt_softplus=True, backend=backend)
        return self.out_proj(y)


class GatedMLP(nn.Module):
    """SwiGLU MLP as state-spaces/mamba's GatedMLP: fc1 → [y; gate], out = fc2(y · silu(gate))."""

    def __init__(self, config: MoaiMambaConfig):
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (..., 2I) = [y; gate]
        if _use_triton(self.config, h.device) and not (torch.is_grad_enabled() and h.requires_grad):
            from ..kernels.triton_norm import silu_mul_triton

            return self.fc2(silu_mul_triton(h))  # inference: one kernel, the same bits as below
        y, gate = h.chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


class MambaBlock(GradientCheckpointingLayer):
    """RMSNorm → mixer → residual add; RMSNorm → SwiGLU MLP → residual add."""

    def __init__(self, config: MoaiMambaConfig, layer_idx: int):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = MambaMixer(config, layer_idx)
        if config.intermediate_size > 0:
            self.norm2 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = GatedMLP(config)
        else:
            self.norm2 = self.mlp = None

    def forward(self, hidden_states: torch.Tensor, cache: MoaiMambaCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: the residual stream (B, L, d), fp32 when `residual_in_fp32`. With the Triton backend
        the norms are fused kernels and the mixer's residual add is fused into norm2."""
        fused = _use_triton(self.mixer.config, hidden_states.device)
        residual = hidden_states
        normed, _ = self.norm.add_norm(None, residual, fused)
        mixed = self.mixer(normed, cache=cache, attention_mask=attention_mask)
        if self.mlp is None:
            return residual + mixed
        normed, residual = self.norm2.add_norm(mixed, residual, fused)
        return residual + self.mlp(normed)

    def step(self, hidden: torch.Tensor | None, residual: torch.Tensor,
             cache: MoaiMambaCache) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step in mamba-ssm's (hidden, residual) form, so that every residual add is fused into the
        norm that follows it: hidden (B, d) is the previous block's output before its residual add (None for the
        first block), residual (B, d) the stream up to it. Returns this block's (hidden, residual)."""
        fused = _use_triton(self.mixer.config, residual.device)
        normed, residual = self.norm.add_norm(hidden, residual, fused)
        hidden = self.mixer.step(normed, cache)
        if self.mlp is not None:
            normed, residual = self.norm2.add_norm(hidden, residual, fused)
            hidden = self.mlp(normed)
        return hidden, residual


@dataclass
class MoaiMambaOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    cache: MoaiMambaCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class MoaiMambaCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: MoaiMambaCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class MoaiMambaPreTrainedModel(PreTrainedModel):
    config_class = MoaiMambaConfig
    config: MoaiMambaConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _no_split_modules = ["MambaBlock"]
    _keep_in_fp32_modules = ["A_log", "D"]
    supports_gradient_checkpointing = True
    _is_stateful = True
    _keys_to_ignore_on_load_unexpected = [r"\.rotary_emb\."]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Mamba keeps its own fixed-size recurrent cache, created by the first forward in `generate`.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """state-spaces/mamba initialisation (through HF's `init`, which skips weights loaded from a file)."""
        cfg = self.config
        # Residual rescale (GPT-2 scheme): out_proj and fc2 scaled by 1/sqrt(#residual adds per layer · n_layer).
        n_residuals = 1 if cfg.intermediate_size == 0 else 2
        rescale = 1.0 / math.sqrt(n_residuals * cfg.num_hidden_layers) if cfg.rescale_prenorm_residual else 1.0
        if isinstance(module, nn.Linear | nn.Conv1d):
            # torch's default (kaiming-uniform, a=√5): bound 1/√fan_in, as state-spaces/mamba leaves it.
            fan_in = module.weight[0].numel()
            init.uniform_(module.weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            if module.bias is not None:
                if isinstance(module, nn.Conv1d):
                    init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
                else:
                    init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, GatedMLP):
            fan_in = module.fc2.weight.shape[1]
            bound = rescale / math.sqrt(fan_in)
            init.uniform_(module.fc2.weight, -bound, bound)
        elif isinstance(module, MambaMixer):
            E, N = module.d_inner, module.d_state
            A = torch.arange(1, N + 1, dtype=torch.float32, device=module.A_log.device).repeat(E, 1)
            init.copy_(module.A_log, torch.log(A))
            init.ones_(module.D)
            # Δ projection: weight ~ U(±dt_rank^-0.5·dt_scale); bias = softplus⁻¹(Δ0), Δ0 log-uniform in
            # [dt_min, dt_max] (Mamba paper, §3.6 / appendix), so that initial step sizes span that range.
            std = module.dt_rank ** -0.5 * cfg.dt_scale
            if cfg.dt_init == "constant":
                init.constant_(module.dt_proj.weight, std)
            else:
                init.uniform_(module.dt_proj.weight, -std, std)
            dt = torch.exp(
                torch.rand(E, dtype=torch.float32, device=module.D.device)
                * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min)
            ).clamp(min=cfg.dt_init_floor)
            init.copy_(module.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            bound = rescale / math.sqrt(E)
            init.uniform_(module.out_proj.weight, -bound, bound)


class MoaiMambaModel(MoaiMambaPreTrainedModel):
    """Embedding → Mamba layers → final RMSNorm."""

    def __init__(self, config: MoaiMambaConfig):
        super().__init__(config)
        self.embedding = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MambaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding = value

    def decode_step(self, inputs_embeds: torch.Tensor, cache: MoaiMambaCache) -> torch.Tensor:
        """One token after a prefill: inputs_embeds (B, d) → the final-normed hidden state (B, d); advances the
        cache's states (not its `seqlen_offset`). Each residual add is fused into the next norm (`MambaBlock.step`)."""
        residual = inputs_embeds.float() if self.config.residual_in_fp32 else inputs_embeds
        hidden = None
        for layer in self.layers:
            hidden, residual = layer.step(hidden, residual, cache)
        normed, _ = self.norm_f.add_norm(hidden, residual, _use_triton(self.config, residual.device))
        return normed

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: MoaiMambaCache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MoaiMambaOutput | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            check_input_ids(input_ids, self.embedding.num_embeddings)
            inputs_embeds = self.embedding(input_ids)
        batch, length = inputs_embeds.shape[:2]
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = MoaiMambaCache(self.config, batch, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        if not use_cache:
            cache = None
        if attention_mask is not None and (cache is None or cache.seqlen_offset == 0) and bool(attention_mask.all()):
            attention_mask = None  # nothing to mask: skip the extra multiplies
        if cache is not None and cache.seqlen_offset > 0 and length == 1 and not output_hidden_states:
            hidden_states = self.decode_step(inputs_embeds[:, 0], cache)[:, None]
            cache.seqlen_offset += 1
            out = MoaiMambaOutput(last_hidden_state=hidden_states, cache=cache)
            return out if return_dict is not False else out.to_tuple()
        hidden_states = inputs_embeds.float() if self.config.residual_in_fp32 else inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, cache=cache, attention_mask=attention_mask)
        hidden_states = self.norm_f(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        if cache is not None:
            cache.seqlen_offset += length
        out = MoaiMambaOutput(last_hidden_state=hidden_states, cache=cache,
                              hidden_states=tuple(all_hidden) if all_hidden is not None else None)
        return out if return_dict is not False else out.to_tuple()


class MoaiMambaForCausalLM(MoaiMambaPreTrainedModel, GenerationMixin):
    """Mamba language model with an LM head, HF `generate` with an O(1) recurrent cache, and a chunked loss."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embedding.weight"}

    def __init__(self, config: MoaiMambaConfig):
        super().__init__(config)
        self.backbone = MoaiMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.loss_chunk_size = 512  # tokens per loss chunk: see benchmarks/bench_chunked_loss.py
        self.post_init()
        if config.use_checkpoint:
            # `activation_checkpointing_enable` replaced `gradient_checkpointing_enable` in transformers 5.2x.
            enable = getattr(self, "activation_checkpointing_enable", None) or self.gradient_checkpointing_enable
            enable()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.embedding = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, inputs_embeds=None,
                                      is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, cache=cache, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration, **kwargs,
        )
        if cache is not None and cache.seqlen_offset > 0:
            # Padding only matters in the prefill; afterwards every new token is real.
            model_inputs["attention_mask"] = None
        model_inputs.pop("position_ids", None)  # no position encoding in Mamba
        return model_inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: MoaiMambaCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> MoaiMambaCausalLMOutput | tuple:
        """Causal LM forward.

        labels (B, L): the loss is the shifted next-token cross-entropy (labels are shifted inside), with
        -100 and padded positions (attention_mask == 0) ignored, computed in chunks so the full fp32 logits
        are never materialised. With labels, logits are returned only if `return_logits=True`.
        `logits_to_keep` = k > 0 computes logits for the last k positions only (generation).
        """
        outputs = self.backbone(
            input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache, use_cache=use_cache,
            attention_mask=attention_mask, output_hidden_states=output_hidden_states, return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        loss, logits = lm_head_outputs(
            hidden_states, self.lm_head, self.config.vocab_size, labels, attention_mask,
            chunk_size=self.loss_chunk_size, num_items_in_batch=num_items_in_batch,
            logits_to_keep=logits_to_keep, return_logits=return_logits,
        )
        out = MoaiMambaCausalLMOutput(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states)
        return out if return_dict is not False else out.to_tuple()
