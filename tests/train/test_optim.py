"""Weight-decay groups by name, the LR schedule, exact gradient accumulation, vocabulary resizing, params."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import load_weights

from moai_lib.train import (
    TrainConfigError,
    TrainParams,
    build_model,
    lr_factor,
    param_groups,
    pretrain,
    resize_token_embeddings,
)


def test_weight_decay_groups_by_name_survive_from_pretrained(tmp_path, tiny_config):
    from transformers import AutoModelForCausalLM

    build_model(tiny_config, seed=0).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    # The attribute that state-spaces/mamba's optimizer setup reads is gone after loading: names are what's left.
    assert not hasattr(model.backbone.layers[0].mixer.A_log, "_no_weight_decay")
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert set(no_decay["names"]) == {"backbone.norm_f.weight", *(
        f"backbone.layers.{i}.{m}" for i in range(2) for m in (
            "mixer.A_log", "mixer.D", "mixer.conv1d.bias", "mixer.dt_proj.bias", "norm.weight", "norm2.weight"))}
    assert set(decay["names"]) == {
        "backbone.embedding.weight",  # tied with lm_head: listed once
        *(f"backbone.layers.{i}.{m}.weight" for i in range(2) for m in (
            "mixer.in_proj", "mixer.conv1d", "mixer.x_proj", "mixer.dt_proj", "mixer.out_proj", "mlp.fc1", "mlp.fc2"))}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_then_cosine_to_the_floor():
    f = [lr_factor(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(21)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and f[4] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(f[4:20], f[5:21], strict=True))
    assert f[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))) and f[20] == pytest.approx(0.1)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, sample_shards, tiny_config):
    """2 micro-batches of 4 and 1 batch of 8 over the same 8 sequences give the same update (fp32 tolerance).

    Adam with its usual eps is invariant to the gradient's scale, so it would hide a loss that is, say, summed
    instead of averaged over micro-batches; with adam_eps = 1 (≫ |g|) the update is ≈ lr·g, linear in the
    gradient, and no clipping: any wrong scaling of the accumulated gradient shows.
    """
    common = dict(max_length=32, max_steps=2, learning_rate=1e-2, warmup_steps=0, adam_eps=1.0, max_grad_norm=None,
                  weight_decay=0.0, eval_batches=1, progress=False)
    runs = {"accumulated": dict(batch_size=4, gradient_accumulation_steps=2), "big": dict(batch_size=8),
            "half_lr": dict(batch_size=8, learning_rate=5e-3)}  # what a gradient off by 2× would look like
    for name, extra in runs.items():
        pretrain(TrainParams(**{**common, **extra}), tiny_config, sample_shards, tmp_path / name)
    a, b, half = (load_weights(tmp_path / name / "model") for name in runs)
    initial = build_model(tiny_config, seed=0).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-8)
    moved = [n for n in a if not torch.equal(a[n], initial[n])]
    assert {"backbone.embedding.weight", "backbone.layers.0.mixer.in_proj.weight", "backbone.layers.1.mlp.fc2.weight"} \
        <= set(moved)
    assert not all(torch.allclose(a[n], half[n], rtol=1e-6, atol=1e-8) for n in a)  # and the check can fail


def test_resize_token_embeddings_keeps_old_rows_and_ties(tiny_config):
    model = build_model(tiny_config, seed=0)
    old = model.get_input_embeddings().weight.detach().clone()
    resize_token_embeddings(model, tiny_config.vocab_size + 3)
    emb = model.get_input_embeddings().weight
    assert model.config.vocab_size == 515 and emb.shape[0] == 520  # padded to a multiple of 8
    assert torch.equal(emb[:512], old[:512])
    torch.testing.assert_close(emb[513], old[:512].mean(0))
    assert model.get_output_embeddings().weight is emb
    ids = torch.tensor([[1, 514, 3]])
    assert model(input_ids=ids, labels=ids).loss.isfinite()


@pytest.mark.parametrize("field, value, needle", [
    ("learning_rate", -1e-3, "learning_rate must be a finite number > 0"),
    ("learning_rate", float("nan"), "learning_rate must be a finite number > 0"),
    ("batch_size", 0, "batch_size must be an integer ≥ 1"),
    ("gradient_accumulation_steps", 1.5, "gradient_accumulation_steps must be an integer ≥ 1"),
    ("num_epochs", 0, "num_epochs must be a finite number > 0"),
    ("min_lr_ratio", 2, "min_lr_ratio must be a finite number ≥ 0 and ≤ 1"),
    ("adam_beta2", 1.0, "adam betas must be < 1"),
    ("nan_policy", "ignore", "nan_policy must be one of stop, skip"),
    ("mixed_precision", "fp16", "mixed_precision must be one of auto, no, bf16"),
])
def test_train_params_reject_bad_values(field, value, needle):
    with pytest.raises(TrainConfigError, match=needle):
        TrainParams(**{field: value})


def test_train_params_from_dict_rejects_unknown_keys():
    with pytest.raises(TrainConfigError, match="unknown training parameter.*learnin_rate"):
        TrainParams.from_dict({"learnin_rate": 1e-3})
