"""The NaN/Inf guard: stop naming the step and the last good checkpoint, which stays intact; or skip the step."""

from __future__ import annotations

import pytest
import torch

from moai_lib.train import NonFiniteLossError, TrainParams, build_model, pretrain, verify_checkpoint

PARAMS = dict(batch_size=4, gradient_accumulation_steps=2, max_length=32, max_steps=8, learning_rate=3e-3,
              warmup_steps=2, save_every=2, eval_batches=2, progress=False)


def poisoned_model(config, bad_steps: set[int], accumulation: int = 2, value: float | str = float("nan")):
    """A fresh model whose training loss becomes `value` on the 1-based optimizer steps in `bad_steps`;
    value "grad" keeps the loss finite but makes the gradients NaN (0 · d√u/du at u = 0)."""
    model = build_model(config, seed=0)
    calls = {"n": 0}

    def hook(module, args, kwargs, output):
        if not module.training:
            return output
        step = calls["n"] // accumulation + 1
        calls["n"] += 1
        if step in bad_steps and value == "grad":
            output.loss = output.loss + 0.0 * torch.sqrt(module.lm_head.weight.sum() * 0.0)
        elif step in bad_steps:
            output.loss = output.loss * value
        return output

    model.register_forward_hook(hook, with_kwargs=True)
    return model


def test_nan_stops_naming_step_and_last_good_checkpoint(tmp_path, sample_shards, tiny_config):
    model = poisoned_model(tiny_config, bad_steps={5})
    with pytest.raises(NonFiniteLossError) as err:
        pretrain(TrainParams(**PARAMS), model, sample_shards, tmp_path)
    message = str(err.value)
    last_good = tmp_path / "checkpoints" / "step-00000004"
    assert "non-finite loss nan at step 5" in message and str(last_good) in message
    assert err.value.step == 5 and err.value.last_checkpoint == last_good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert verify_checkpoint(last_good) is None  # intact, checksums and all
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("value, what", [(float("inf"), "loss inf"), ("grad", "gradient norm nan")])
def test_non_finite_step_is_caught_before_the_update(value, what, tmp_path, sample_shards, tiny_config):
    model = poisoned_model(tiny_config, bad_steps={1}, value=value)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=f"non-finite {what} at step 1; .*last good checkpoint: none"):
        pretrain(TrainParams(**PARAMS), model, sample_shards, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step was taken
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_skip_policy_skips_the_bad_step_and_finishes(tmp_path, sample_shards, tiny_config):
    model = poisoned_model(tiny_config, bad_steps={3})
    metrics = pretrain(TrainParams(**PARAMS, nan_policy="skip"), model, sample_shards, tmp_path)
    assert metrics["completed"] and metrics["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite steps up to step 5"):
        pretrain(TrainParams(**PARAMS, nan_policy="skip", max_skipped_steps=2, resume=False),
                 poisoned_model(tiny_config, bad_steps={4, 5}), sample_shards, tmp_path / "again")
