"""Training: `pretrain(TrainParams(...), config_or_model_or_path, data_dir, out_dir) -> metrics`.

    params.py      TrainParams (validated), TrainConfigError
    optim.py       AdamW groups by parameter name, warmup + cosine schedule, vocabulary resizing
    checkpoint.py  atomic, checksummed, pickle-free checkpoints; newest complete one found on resume
    evaluate.py    validation perplexity (overall, per language) and the unigram baseline
    loop.py        the loop on `accelerate`: accumulation, clipping, NaN guard, checkpoints, progress
    signature.py   what a checkpoint records of its run and model; what a resuming run may change
    distributed.py DDP / FSDP2 under torchrun or accelerate launch; consolidated checkpoints across world sizes
    memory.py      memory per GPU of a preset under DDP / FSDP2 (weights, grads, AdamW, activations)
"""

from .checkpoint import TornCheckpointWarning, find_latest_checkpoint, save_checkpoint, verify_checkpoint
from .evaluate import evaluate, unigram_perplexity
from .loop import (
    NonFiniteLossError,
    StepSampler,
    build_model,
    check_resume,
    check_train_inputs,
    model_config,
    pretrain,
)
from .optim import build_optimizer, build_scheduler, lr_factor, no_weight_decay, param_groups, resize_token_embeddings
from .params import TrainConfigError, TrainParams

__all__ = [
    "NonFiniteLossError",
    "StepSampler",
    "TornCheckpointWarning",
    "TrainConfigError",
    "TrainParams",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "check_resume",
    "check_train_inputs",
    "evaluate",
    "find_latest_checkpoint",
    "lr_factor",
    "model_config",
    "no_weight_decay",
    "param_groups",
    "pretrain",
    "resize_token_embeddings",
    "save_checkpoint",
    "unigram_perplexity",
    "verify_checkpoint",
]
