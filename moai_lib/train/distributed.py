"""Data-parallel strategies of `pretrain` on existing engines: torchrun / `accelerate launch`, DDP, FSDP2.

    "no"     one process: the reference path (bitwise-exact resume on CPU)
    "ddp"    accelerate's DistributedDataParallel: each rank holds the whole model; gradients all-reduced
    "fsdp2"  `torch.distributed.fsdp.fully_shard` on every Mamba layer (`_no_split_modules`), on the embedding
             when untied, and on the root (LM head, norm_f): weights, gradients and AdamW moments are sharded
             over the ranks (1/world each); a layer's weights are all-gathered just before its forward/backward
             and freed after. With `gradient_checkpointing` each layer's activations are recomputed in the
             backward.

Every strategy sees the same data: optimizer step s uses the global batch `StepSampler.indices(s)` (a pure
function of seed and step), and rank r takes micro-batch m's slice [(m·world + r)·B, +B), so the union
over ranks and micro-batches is the same set of sequences whatever the world size.

Checkpoints are always *consolidated* (one full state dict written by rank 0, in the same format as a
one-process run, see `checkpoint.py`): under FSDP2 the shards are gathered to rank 0's CPU first. Any
checkpoint therefore resumes on any world size and strategy, as long as the global batch
(batch_size × gradient_accumulation_steps × processes) is unchanged; a 16b run needs ~200 GB of host RAM on
rank 0 for the gather (weights + two AdamW moments in fp32).

Mixed precision on GPU ("bf16"): DDP runs bf16 autocast over fp32 weights (accelerate); FSDP2 uses
`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` (weights all-gathered in bf16, gradients
reduce-scattered in fp32 into fp32 master shards) plus autocast. The forward inputs are not cast, so the
residual stream stays fp32 (`residual_in_fp32`). Trade-off: under that policy A_log and D are all-gathered in
bf16 too (their fp32 masters are updated in fp32); use mixed_precision "no" to keep them fp32 throughout.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections.abc import Iterator

import torch
from torch import nn

from .params import TrainConfigError

logger = logging.getLogger(__name__)

STRATEGIES = ("no", "ddp", "fsdp2")
ENV_STRATEGY = "MOAI_DISTRIBUTED"


def world_size_from_env() -> int:
    """The number of processes a launcher (torchrun, accelerate launch, SLURM via torchrun) started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_only_launch() -> bool:
    """Several processes and no GPU (gloo on CPU, e.g. tests): accelerate must be told `cpu=True`, or it
    treats each rank as a separate one-process run."""
    return world_size_from_env() > 1 and not torch.cuda.is_available()


def resolve_strategy(choice: str, world: int) -> str:
    """"auto" → env MOAI_DISTRIBUTED if set, else "ddp" with several processes and "no" with one."""
    if choice == "auto":
        env = os.environ.get(ENV_STRATEGY, "").strip().lower()
        if env and env not in STRATEGIES:
            raise TrainConfigError(f"{ENV_STRATEGY} must be one of {', '.join(STRATEGIES)}, got {env!r}")
        choice = env or ("ddp" if world > 1 else "no")
    if choice == "no" and world > 1:
        raise TrainConfigError(f"distributed is 'no' but {world} processes were launched: use 'ddp' or 'fsdp2' "
                               "(or 'auto'), or launch one process")
    if choice == "ddp" and world == 1:
        return "no"  # DDP over one process is the plain loop
    return choice


def ensure_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group even on one process (a one-GPU FSDP2 run, or a test without torchrun)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _layer_classes(model: nn.Module) -> tuple[str, ...]:
    names = tuple(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise TrainConfigError(f"{type(model).__name__} declares no _no_split_modules: FSDP2 does not know its layers")
    return names


def structure_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every parameter and buffer on the meta device (no memory): the module tree that
    rank 0 fills with the gathered full state to save the final model (e.g. after QAT's convert step)."""
    memo: dict[int, object] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def apply_fsdp2(model: nn.Module, device: torch.device, mixed_precision: str) -> nn.Module:
    """Shard `model` in place: `fully_shard` on each layer, then on the root. Returns the model, whose
    parameters are now DTensors (Shard(0) over the ranks) on `device`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    else:
        mp = MixedPrecisionPolicy()
    layer_types = _layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    for i, layer in enumerate(layers):
        # The last layer's weights are needed again at once by the backward: keep them gathered.
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is not embedding.weight:
        # Untied (2b, 8b, 16b: 128K × d each): the embedding gets its own group, gathered only around its use
        # instead of for the whole step as part of the root. The LM head stays in the root: the chunked loss
        # reads `lm_head.weight` without calling the module, so a group of its own would never be gathered.
        fully_shard(embedding, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    logger.info("FSDP2: %d layers sharded over %d processes (%s)", len(layers), mesh.size(),
                "bf16 params, fp32 reduce" if mixed_precision == "bf16" else "fp32")
    return model


def meta_model(model_or_config) -> nn.Module:
    """The model that `build_model` would return, on the meta device (no memory, no initialisation): what
    ranks other than 0 shard under FSDP2 before rank 0's weights are broadcast into their shards."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    config = model_or_config if isinstance(model_or_config, PretrainedConfig) else AutoConfig.from_pretrained(
        model_or_config, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def broadcast_from_rank0(model: nn.Module, full_state: dict | None, device: torch.device) -> None:
    """Fill every rank's shards of a sharded model with rank 0's full weights (`full_state`, a plain
    `state_dict()` on rank 0, None elsewhere); meta-device shards are allocated first. Collective.

    So only rank 0 ever holds the whole model in host memory (65 GB for 16b in fp32), and all ranks start
    from the same weights whatever each built."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(getattr(p, "_local_tensor", p).is_meta for p in model.parameters()):
        model.to_empty(device=device)
    set_model_state_dict(model, full_state or {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, accelerator, last_micro_batch: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch (DDP). FSDP2 reduce-scatters every
    micro-batch instead: skipping it would keep full unsharded gradients of every layer (for 16b, 32–64 GB)."""
    if last_micro_batch or is_fsdp(model):
        yield
    else:
        with accelerator.no_sync(model):
            yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm over all shards (a plain tensor), clipping to `max_norm` (inf: no clipping)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


# Consolidated (full) state dicts ------------------------------------------------------------------------------
def _names_by_param(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The names of each optimizer parameter, in the optimizer's index order (tied weights: several names)."""
    names = _names_by_param(model)
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_model_state(model: nn.Module) -> dict | None:
    """Gather the sharded weights to rank 0's CPU (a collective: every rank calls it). On rank 0:
    {"state": tensors without duplicate tied names, "metadata": {removed tied name: kept name}}; else None."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    tied: dict[str, str] = {}
    for group in _names_by_param(model).values():
        keep = sorted(group)[0]  # the name safetensors' save_model keeps
        tied.update({name: keep for name in group if name != keep})
    return {"state": {k: v.contiguous() for k, v in model_sd.items() if k not in tied}, "metadata": tied}


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
    """`full_model_state` and the full optimizer state keyed by parameter index like `optimizer.state_dict()`
    (rank 0; (None, None) on other ranks). Collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model_state = full_model_state(model)
    optim_sd = get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None, None
    index = {}
    for i, names in enumerate(optimizer_param_names(model, optimizer)):
        index.update({name: i for name in names})
    state = {index[name]: value for name, value in optim_sd["state"].items()}
    groups = [{**g, "params": sorted({index[name] for name in g["params"]})} for g in optim_sd["param_groups"]]
    return model_state, {"state": state, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Load an index-keyed full optimizer state (from a consolidated checkpoint) into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = optimizer_param_names(model, optimizer)
    by_name = {"state": {names[int(i)][0]: value for i, value in state_dict["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)][0] for i in g["params"]]}
                                for g in state_dict["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def materialize(skeleton: nn.Module, model_state: dict) -> nn.Module:
    """Fill a `structure_copy` with a gathered full state (rank 0) and re-tie shared weights."""
    full = dict(model_state["state"])
    for removed, kept in model_state["metadata"].items():
        full[removed] = full[kept]
    skeleton.load_state_dict(full, assign=True, strict=True)
    if hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()
    return skeleton
