"""Crash-safe training checkpoints: no pickle, atomic directories, a checksummed manifest written last.

    out_dir/checkpoints/step-00000100/
        model.safetensors        weights (tied tensors stored once)
        optimizer.safetensors    AdamW moments and step counts, keyed "<param index>.<name>"
        rng.safetensors          torch CPU (and CUDA) generator states, numpy's MT state
        trainer_state.json       step, data position, scheduler state, optimizer groups, python RNG, run signature
        manifest.json            {file: bytes, sha256} of all of the above; written last

A checkpoint is written into a hidden temporary directory (each file fsync'ed), the manifest last, then the
directory is renamed into place. A directory without a valid manifest, or whose files do not match it, is
torn (the process died mid-write, or the disk was damaged): `find_latest_checkpoint` skips it with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ..data.tokenizer import fsync_dir, make_temp_dir, replace_dir

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "moai-checkpoint-v1"
_NAME = re.compile(r"^step-(\d+)$")


class TornCheckpointWarning(UserWarning):
    """A checkpoint directory is incomplete or damaged and was skipped."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


# Optimizer and RNG state as tensors + JSON --------------------------------------------------------------------
def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {}
    for pid, entry in state_dict["state"].items():
        plain[str(pid)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[str(pid)][key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"state": plain, "param_groups": groups}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(pid): dict(values) for pid, values in meta["state"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    meta = {"python": [version, list(mt), gauss], "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, tensors["numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# Save / verify / find / load -----------------------------------------------------------------------------------
def save_checkpoint(root: str | os.PathLike, step: int, model: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer | None, scheduler, trainer_state: dict, *,
                    model_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write checkpoint `step` atomically under `root`; returns its directory. `model` is the unwrapped model.

    A sharded (FSDP2) run passes the gathered full states instead of `model`/`optimizer`: `model_state`
    {"state": tensors without duplicate tied names, "metadata": {removed name: kept name}} and
    `optimizer_state` keyed by parameter index (see `distributed.full_state_dicts`); the files are then the
    same as a one-process run's, so either resumes the other."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = make_temp_dir(final)
    try:
        if model_state is not None:
            save_file(model_state["state"], str(tmp / "model.safetensors"), metadata=model_state["metadata"] or None)
        else:
            save_model(model, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state if optimizer_state is not None
                                                   else optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
            _fsync_file(tmp / name)
        _write_json(tmp / "trainer_state.json", {**trainer_state, "step": step, "optimizer": opt_meta,
                                                 "scheduler": scheduler.state_dict(), "rng": rng_meta})
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        _write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "files": files})
        fsync_dir(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved checkpoint %s", final)
    return final


def verify_checkpoint(path: str | os.PathLike, checksums: bool = True) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            return f"unknown format {manifest.get('format')!r}"
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({type(exc).__name__})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if checksums and _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint directory under `root`, newest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def find_latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root`; torn ones are skipped with a `TornCheckpointWarning`."""
    for _, path in list_checkpoints(root):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        message = f"skipping torn checkpoint {path}: {reason}"
        logger.warning(message)
        warnings.warn(message, TornCheckpointWarning, stacklevel=2)
    return None


def remove_stale_temp_dirs(root: str | os.PathLike) -> None:
    """Delete temporary checkpoint directories left by a process that died while writing one."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(".step-"):
                shutil.rmtree(p, ignore_errors=True)


def rotate_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints; delete older ones and torn ones older than the newest kept."""
    kept = 0
    for _, path in list_checkpoints(root):
        complete = verify_checkpoint(path, checksums=False) is None
        if complete and kept < keep:
            kept += 1
        elif kept > 0:  # never delete anything newer than the newest complete checkpoint
            shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))


def load_model_weights(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into an unsharded model (before FSDP2 shards it)."""
    path = Path(path)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")


def read_optimizer_state(path: str | os.PathLike, trainer_state: dict) -> dict:
    """The full optimizer state dict of a checkpoint, keyed by parameter index."""
    return _unflatten_optimizer(load_file(str(Path(path) / "optimizer.safetensors")), trainer_state["optimizer"])


def restore_rng(path: str | os.PathLike, trainer_state: dict) -> None:
    _set_rng_state(load_file(str(Path(path) / "rng.safetensors")), trainer_state["rng"])


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler) -> dict:
    """Restore model weights, optimizer, scheduler and RNG states in place; returns the trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    load_model_weights(path, model)
    optimizer.load_state_dict(read_optimizer_state(path, state))
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(path, state)
    return state
