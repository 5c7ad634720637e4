"""Training memory per GPU of a config under DDP and FSDP2: weights, gradients, AdamW, activations.

An estimate for planning (which preset fits which GPUs at which sequence length), from the parameter counts
of `moai_lib.model.info` (meta device) and these assumptions, bf16 mixed precision with AdamW:

  DDP (accelerate, bf16 autocast over fp32 weights), per GPU:
    fp32 weights 4P + fp32 gradients 4P + DDP's gradient buckets 4P (gradient_as_bucket_view off)
    + AdamW moments 8P + the bf16 weight copies autocast keeps for the backward 2P           = 22 bytes/param
  FSDP2 (`fully_shard` per layer, bf16 params, fp32 reduce) on W GPUs, per GPU:
    sharded fp32 weights, gradients and AdamW moments 16P/W
    + gathered groups: two layers in bf16 (the running one and the prefetched next) and one layer's unsharded
      gradients (bf16 + fp32 for the reduce-scatter): 10 bytes per parameter of one layer; plus the root group
      (LM head, norm_f; with tied embeddings also the embedding) gathered for the whole step, with its
      gradients at the end: 8 bytes per parameter (an untied embedding is its own group, gathered only
      around its use)

  Activations saved for the backward, per token and layer (bf16 unless noted; d = hidden_size,
  E = d_inner = 2d, I = intermediate_size), with a fused scan that recomputes its states (Triton / mamba-ssm):
    mixer: RMSNorm in fp32 (input + normalised, 8d), in_proj input 2d, [x; z] 4E, conv pre-activation and
           SiLU output 4E, Δ 2E, scan output 2E, out_proj input 2E                               ≈ 10d + 14E
    MLP:   RMSNorm 8d, fc1 input 2d, gate 2I, y 2I, SiLU(gate) 2I, fc2 input 2I                   = 10d + 8I
    → 48d + 8I bytes (2b: 144 KiB per token per layer). With activation checkpointing only each layer's
      input (the fp32 residual stream, 4d) is kept, plus one layer's full activations during its recompute.
  Plus the loss: the logits of one chunk (2 · 512 · V · 4 bytes: fp32 logits and their gradient for 512 tokens
  on the torch path, or the fused path's compute-dtype buffer for 8/itemsize as many tokens, the same bytes), and
  on GPUs the fused path's gradients, computed in its forward and kept until the backward: dW in fp32 (4 · V · d)
  and dh in the activations' dtype (4 · tokens · d with the fp32 final norm output).

Not counted: the CUDA context and NCCL buffers (~1–3 GiB), allocator fragmentation (typically 5–15 %), and the
pure-torch scan's per-step states (the CPU/reference path is not meant for these sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MoaiMambaConfig, load_mamba_config

LOSS_CHUNK = 512  # tokens per chunk of the LM-head loss (MoaiMambaForCausalLM.loss_chunk_size)
GiB = 2**30


@dataclass
class TrainingMemory:
    """Bytes per GPU of one training configuration; `total` is their sum."""

    strategy: str
    world_size: int
    seq_len: int
    micro_batch: int
    checkpointing: bool
    weights: float
    gradients: float
    optimizer: float
    gathered: float
    activations: float
    loss: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations + self.loss


def activation_bytes_per_token_layer(config: MoaiMambaConfig) -> int:
    """Bytes saved for the backward per token and layer, without checkpointing (see the module docstring)."""
    d, E, I = config.hidden_size, config.d_inner, config.intermediate_size
    mixer = 10 * d + 14 * E
    mlp = 10 * d + 8 * I if I > 0 else 0
    return mixer + mlp


def training_memory(config: MoaiMambaConfig, strategy: str = "fsdp2", world_size: int = 8, seq_len: int = 2048,
                    micro_batch: int = 1, checkpointing: bool = True, counts: dict | None = None) -> TrainingMemory:
    """Estimated memory per GPU (bytes, by kind) for training `config` with bf16 mixed precision and AdamW.

    Args:
        strategy: "ddp" (every GPU holds everything) or "fsdp2" (sharded over `world_size` GPUs).
        seq_len, micro_batch: tokens per sequence and sequences per GPU per micro-batch.
        checkpointing: activation checkpointing of every layer.
        counts: `moai_lib.model.info.count_parameters(config)`, when already computed.
    """
    from ..model.info import count_parameters

    if strategy not in ("ddp", "fsdp2"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp2', got {strategy!r}")
    counts = counts or count_parameters(config)
    P = counts["total"]
    # The root group (LM head, norm_f, and the embedding when tied) stays gathered for the whole step.
    P_vocab = counts["lm_head"] + counts["norm_f"] + (counts["embedding"] if counts["tied"] else 0)
    P_layer = max(layer["total"] for layer in counts["layers"])
    tokens = seq_len * micro_batch
    L = config.num_hidden_layers
    per_layer = activation_bytes_per_token_layer(config) * tokens
    if checkpointing:
        activations = L * 4 * config.hidden_size * tokens + per_layer
    else:
        activations = L * per_layer
    activations += 4 * config.hidden_size * tokens  # embedding output / final norm input (fp32 residual)
    # One chunk's logits (+ gradient), then the fused loss's dW (fp32) and dh, alive from its forward to its backward.
    loss = 2 * min(LOSS_CHUNK, tokens) * config.padded_vocab_size * 4
    loss += 4 * config.padded_vocab_size * config.hidden_size + 4 * tokens * config.hidden_size
    if strategy == "ddp":
        return TrainingMemory("ddp", world_size, seq_len, micro_batch, checkpointing, weights=4 * P + 2 * P,
                              gradients=8 * P, optimizer=8 * P, gathered=0, activations=activations, loss=loss)
    W = world_size
    return TrainingMemory("fsdp2", W, seq_len, micro_batch, checkpointing, weights=4 * P / W, gradients=4 * P / W,
                          optimizer=8 * P / W, gathered=8 * P_vocab + 10 * P_layer, activations=activations,
                          loss=loss)


def format_memory_table(presets: tuple[str, ...] = ("2b", "8b", "16b"), seq_lens: tuple[int, ...] = (2048, 8192),
                        world_size: int = 8, micro_batch: int = 1) -> str:
    """A Markdown table: GiB per GPU for each preset (or config path) × sequence length × strategy, with and
    without activation checkpointing."""
    rows = [f"Training memory per GPU (GiB; bf16 mixed precision, AdamW; micro-batch {micro_batch} sequence(s) "
            f"per GPU; FSDP2 over {world_size} GPUs; estimates from moai_lib.train.memory)", "",
            "| preset | params | L | strategy | weights+grads+AdamW | gathered | activations (ckpt / none) "
            "| total (ckpt / none) |",
            "|---|---|---|---|---|---|---|---|"]
    from ..model.info import count_parameters

    for name in presets:
        config = load_mamba_config(name)
        counts = count_parameters(config)
        params = counts["total"]
        for L in seq_lens:
            for strategy in ("ddp", "fsdp2"):
                ck = training_memory(config, strategy, world_size, L, micro_batch, True, counts)
                full = training_memory(config, strategy, world_size, L, micro_batch, False, counts)
                static = ck.weights + ck.gradients + ck.optimizer
                rows.append(f"| {name} | {params / 1e9:.2f}B | {L} | {strategy} | {static / GiB:.1f} | "
                            f"{ck.gathered / GiB:.1f} | {ck.activations / GiB:.1f} / {full.activations / GiB:.1f} | "
                            f"{ck.total / GiB:.1f} / {full.total / GiB:.1f} |")
    return "\n".join(rows)
