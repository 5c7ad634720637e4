"""Data-parallel training on CPU with gloo: 2 processes against 1 with the same global batch.

Two ranks forked with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) run tests/train/dist_worker.py
in one process group: DDP for 6 steps (tied tiny preset); FSDP2 (untied, the 2b–16b layout) stopped after step 3,
then resumed to step 6; both with activation checkpointing; and FSDP2's wrapping of the model. Meanwhile this
process runs the one-process references. Each 2-process run has batch_size 2 × 2 micro-batches
× 2 processes = the reference's 4 × 2 × 1 = 8 sequences per step, over the same sequences.

Tolerance: the runs differ only in the order of floating-point sums (per-rank partial gradients, all-reduce
or reduce-scatter, then the same AdamW update), which moves fp32 losses by ~1e-6 relative; after 6 AdamW
steps at lr 1e-2 we allow 1e-4 relative on each step's loss (measured: ≤ 2e-7) and 1e-4 on each final weight
tensor's relative difference ‖a − b‖/‖b‖ (measured: ≤ 4e-5, in the embedding, whose rarely seen rows have
tiny gradients that AdamW's normalisation turns into lr-sized updates, so they amplify rounding the most).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys

import pytest
import torch
from train_helpers import load_weights

from moai_lib import cli
from moai_lib.train import TrainConfigError, TrainParams, check_resume, check_train_inputs, pretrain

COMMON = dict(max_length=32, max_steps=6, learning_rate=1e-2, warmup_steps=1, eval_batches=2, log_every=1,
              progress=False, keep_checkpoints=5)
SINGLE = dict(COMMON, batch_size=4, gradient_accumulation_steps=2)  # 8 sequences per step on 1 process
TWO = dict(COMMON, batch_size=2, gradient_accumulation_steps=2)  # 2 × 2 × 2 processes = 8
LOSS_RTOL = 1e-4
WEIGHT_RTOL = 1e-4  # ‖a − b‖ / ‖b‖ per tensor


def _max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def _rank_main(rank: int, world: int, port: int, spec_path: str) -> None:
    """A forked child set up as torchrun sets up a rank (env), so that no process pays the imports again."""
    import traceback

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1"})
    os.environ.pop("MOAI_DISTRIBUTED", None)
    code = 0
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # the parent's one-process state
        torch.set_num_threads(1)
        import dist_worker

        dist_worker.main(spec_path)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never run the parent's (pytest's) exit handlers in a child


@pytest.fixture(scope="module")
def untied_config(tiny_config):
    """The tiny preset with separate embedding and LM head, the layout of the 2b/8b/16b presets."""
    return type(tiny_config).from_dict({**tiny_config.to_dict(), "tie_word_embeddings": False})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_shards, tiny_config, untied_config):
    """DDP trains the tied tiny preset, FSDP2 the untied one; each against its one-process reference."""
    root = tmp_path_factory.mktemp("distributed")
    tiny_config.save_pretrained(root / "config")
    untied_config.save_pretrained(root / "untied")
    spec = {"config_dir": str(root / "config"), "data_dir": str(sample_shards), "results": str(root / "results.json"),
            "runs": [
                {"name": "ddp", "out_dir": str(root / "ddp"),
                 "params": dict(TWO, distributed="ddp", gradient_checkpointing=True)},
                {"name": "fsdp_first", "out_dir": str(root / "fsdp"), "stop_after_step": 3,
                 "config_dir": str(root / "untied"),
                 "params": dict(TWO, distributed="fsdp2", gradient_checkpointing=True)},
                {"name": "fsdp_resumed", "out_dir": str(root / "fsdp"), "config_dir": str(root / "untied"),
                 "params": dict(TWO, distributed="fsdp2", gradient_checkpointing=True)},
                # rank 0 sees fsdp's checkpoints, rank 1 an empty directory (nodes without shared storage)
                {"name": "split_checkpoints", "out_dir_by_rank": [str(root / "fsdp"), str(root / "elsewhere")],
                 "config_dir": str(root / "untied"), "expect_error": True,
                 "params": dict(TWO, distributed="fsdp2", gradient_checkpointing=True)},
            ]}
    (root / "spec.json").write_text(json.dumps(spec))
    # Fork (not torchrun or spawn): each fresh interpreter would spend ~10 s importing torch and transformers.
    ctx = torch.multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(rank, 2, port, str(root / "spec.json"))) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        single = pretrain(TrainParams(**SINGLE), tiny_config, sample_shards, root / "single")  # meanwhile
        single_untied = pretrain(TrainParams(**SINGLE), untied_config, sample_shards, root / "single_untied")
        for p in procs:
            p.join(timeout=300)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0], "a rank failed: see its traceback in the captured output"
    return root, {"tied": single, "untied": single_untied}, json.loads((root / "results.json").read_text())


def test_ddp_two_processes_match_one_process(runs):
    root, singles, results = runs
    single, ddp = singles["tied"], results["ddp"]
    assert ddp["completed"] and ddp["num_processes"] == 2 and ddp["distributed"] == "ddp"
    assert ddp["global_batch"] == single["global_batch"] == 8
    ref, got = _losses(single["history"]), _losses(ddp["history"])
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=LOSS_RTOL), step
    a, b = load_weights(root / "ddp" / "model"), load_weights(root / "single" / "model")
    assert _max_relative_difference(a, b) < WEIGHT_RTOL


def test_fsdp2_wraps_every_layer_and_shards_parameters(runs):
    wrapping = runs[2]["wrapping"]
    assert wrapping["root_is_fsdp"] and wrapping["layers_are_fsdp"] == [True, True]
    assert wrapping["all_params_dtensor"] and wrapping["world_size"] == 2
    # in_proj (2E, d) = (256, 64): Shard(0) over 2 ranks → 128 rows each.
    assert wrapping["in_proj_global_shape"] == [256, 64] and wrapping["in_proj_local_shape"] == [128, 64]
    # An untied embedding (the 2b/8b/16b layout) is its own group; a tied one stays in the root with the head.
    assert wrapping["embedding_group"] == {"untied": True, "tied": False}


def test_fsdp2_trains_stops_and_resumes_on_the_same_curve(runs):
    root, singles, results = runs
    single, first, resumed = singles["untied"], results["fsdp_first"], results["fsdp_resumed"]
    assert not first["completed"] and first["step"] == 3 and first["distributed"] == "fsdp2"
    assert resumed["completed"] and resumed["resumed_from_step"] == 3
    curve = {**_losses(first["history"]), **_losses(resumed["history"])}
    assert sorted(curve) == list(range(1, 7))
    assert curve[6] < curve[1] - 0.25 and max(curve[s] for s in (4, 5, 6)) < min(curve[s] for s in (1, 2, 3))
    ref = _losses(single["history"])
    for step in ref:
        assert curve[step] == pytest.approx(ref[step], rel=LOSS_RTOL), step
    # The final model was gathered to rank 0 and saved as a plain (unsharded) model.
    a, b = load_weights(root / "fsdp" / "model"), load_weights(root / "single_untied" / "model")
    assert _max_relative_difference(a, b) < WEIGHT_RTOL


def test_two_process_checkpoint_resumes_on_one_process(runs, tmp_path, sample_shards, untied_config):
    """The FSDP2 run's step-3 checkpoint (consolidated) continues on one process with batch_size 4 × 2."""
    root, singles, _ = runs
    single = singles["untied"]
    shutil.copytree(root / "fsdp" / "checkpoints", tmp_path / "checkpoints")
    metrics = pretrain(TrainParams(**SINGLE), untied_config, sample_shards, tmp_path)
    assert metrics["resumed_from_step"] == 3 and metrics["num_processes"] == 1 and metrics["completed"]
    ref, got = _losses(single["history"]), _losses(metrics["history"])
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(ref[step], rel=LOSS_RTOL), step
    a, b = load_weights(tmp_path / "model"), load_weights(root / "single_untied" / "model")
    assert _max_relative_difference(a, b) < WEIGHT_RTOL


def test_ranks_that_see_different_checkpoints_fail_together_before_training(runs):
    """Several machines without shared storage: rank 0 would resume at step 6, rank 1 start afresh."""
    root, _, results = runs
    error = results["split_checkpoints"]["error"]
    assert error is not None and "see different checkpoints" in error and "step-" in error
    assert "storage they all share" in error
    assert not (root / "elsewhere" / "checkpoints").exists() or not any((root / "elsewhere" / "checkpoints").iterdir())


def test_world_size_not_dividing_the_global_batch_is_refused(sample_shards, tiny_config):
    params = TrainParams(**{**SINGLE, "gradient_accumulation_steps": 1, "global_batch_size": 8})
    assert check_train_inputs(params, tiny_config, sample_shards, num_processes=2)
    assert params.accumulation_steps(2) == 1 and params.accumulation_steps(1) == 2
    with pytest.raises(TrainConfigError, match=r"global_batch_size 8 is not divisible by batch_size 4 × world "
                                                r"size 3 = 12"):
        check_train_inputs(params, tiny_config, sample_shards, num_processes=3)


def test_checkpoint_of_another_preset_is_refused_before_building_the_model(runs, tmp_path, sample_shards,
                                                                            untied_config, monkeypatch):
    root, _, _ = runs
    shutil.copytree(root / "fsdp" / "checkpoints", tmp_path / "checkpoints")
    wider = type(untied_config).from_dict({**untied_config.to_dict(), "hidden_size": 96})
    needle = r"different model .*hidden_size: 64 \(checkpoint\) ≠ 96 \(this run\)"
    with pytest.raises(TrainConfigError, match=needle):
        check_resume(TrainParams(**SINGLE), wider, sample_shards, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the checkpoint was checked")

    monkeypatch.setattr("moai_lib.train.loop.build_model", refuse)
    with pytest.raises(TrainConfigError, match=needle):
        pretrain(TrainParams(**SINGLE), wider, sample_shards, tmp_path)


def test_cli_check_only_reports_bad_launches(runs, tmp_path, sample_shards, capsys):
    """What pretrain.sh runs before torchrun: exit 2 and one line naming the parameter, no training."""
    root, _, _ = runs
    out = tmp_path / "out"
    shutil.copytree(root / "fsdp" / "checkpoints", out / "checkpoints")
    base = ["train", "--check_only", "--data_dir", str(sample_shards), "--output_dir", str(out), "--max_length",
            "32", "--max_steps", "6", "--learning_rate", "1e-2", "--warmup_steps", "1", "--batch_size", "4"]
    config = str(root / "untied")
    assert cli.main(base + ["--config", config, "--global_batch_size", "8", "--world_size", "3"]) == 2
    assert "global_batch_size 8 is not divisible by batch_size 4 × world size 3" in capsys.readouterr().err
    other = json.loads((root / "untied" / "config.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({**other, "num_hidden_layers": 3}))
    assert cli.main(base + ["--config", str(tmp_path / "other.json"), "--global_batch_size", "8"]) == 2
    assert "num_hidden_layers: 2 (checkpoint) ≠ 3 (this run)" in capsys.readouterr().err
    assert cli.main(base + ["--config", config, "--global_batch_size", "8", "--world_size", "2"]) == 0
    assert "resumes from" in capsys.readouterr().out
    assert not (out / "model").exists()
