"""The attention baseline: conformance with HF Llama, KV-cached decoding, batched left-padded generation, the
chunked loss, gradient checkpointing, preset sizes against the Mamba presets, and config/input errors."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from moai_lib.config import ConfigError, get_mamba_config, preset_names
from moai_lib.model import transformer
from moai_lib.model.mamba import MoaiMambaForCausalLM
from moai_lib.model.transformer import (
    MoaiTransformerConfig,
    MoaiTransformerForCausalLM,
    build_attention_mask,
    get_transformer_config,
)

# Max abs logit difference (fp32). Against HF Llama (eager attention) and between the cached and full paths
# only the summation order differs, so errors stay near 1e-6; 1e-4 leaves room for other BLAS builds.
LOGIT_TOL = 1e-4
# A preset's parameter count vs the Mamba preset of the same name (the module docstring derives each).
PARAM_COUNT_REL_TOL = 0.01


def tiny_model(seed=0, **overrides):
    """tiny preset (GQA: 4 query heads, 2 key/value heads) with weights large enough that greedy
    generations vary from token to token, and norm weights away from 1."""
    torch.manual_seed(seed)
    model = MoaiTransformerForCausalLM(get_transformer_config("tiny", initializer_range=0.15, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def to_llama(model):
    """The same weights in a `LlamaForCausalLM` of the same shape, loaded 1:1 by parameter name."""
    c = model.config
    llama_config = LlamaConfig(
        vocab_size=c.padded_vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        attn_implementation="eager",
    )
    llama = LlamaForCausalLM(llama_config).eval()
    llama.load_state_dict(model.state_dict(), strict=True)
    return llama


def left_pad(prompts, pad):
    """list of 1-D id tensors → ids (B, L) left-padded with `pad`, attention_mask (B, L)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = p
        mask[i, length - len(p):] = 1
    return ids, mask


# (a) conformance with HF Llama -----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, dict(num_key_value_heads=4, tie_word_embeddings=False)],
                         ids=["gqa-tied", "mha-untied"])
def test_matches_hf_llama_logits_and_greedy_generation(overrides):
    model = tiny_model(**overrides)
    llama = to_llama(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings
    ids = torch.randint(0, 512, (2, 23))
    with torch.no_grad():
        ours, theirs = model(ids).logits, llama(ids).logits
    assert (ours - theirs).abs().max() <= LOGIT_TOL

    # Left padding: positions restart at the first real token in both; compare the real positions.
    ids, mask = left_pad([torch.randint(1, 512, (n,)) for n in (9, 4)], pad=0)
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, llama(ids, attention_mask=mask).logits
    assert torch.isfinite(ours).all()
    assert (ours - theirs)[mask.bool()].abs().max() <= LOGIT_TOL

    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ours, theirs = model.generate(ids, **kwargs), llama.generate(ids, **kwargs)
    assert torch.equal(ours, theirs)
    assert len(set(ours[0, -12:].tolist())) > 2  # a generation that varies, not one token repeated


# (b) KV-cached decoding ------------------------------------------------------------------------------------
def test_cached_decoding_matches_full_forward():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :5], use_cache=True)  # prefill
        steps = [out.logits]
        out = model(ids[:, 5:9], cache=out.cache, use_cache=True)  # 4 tokens at once after a cached prefix
        steps.append(out.logits)
        for t in range(9, 16):  # then one token at a time
            out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    assert out.cache.get_seq_length() == 16
    assert out.cache.layers[0].keys.shape == (2, 2, 16, 16)  # (B, K, S, h): only the key/value heads are cached
    assert (torch.cat(steps, dim=1) - full).abs().max() <= LOGIT_TOL


def test_multi_token_continuation_and_padded_decoding_match_full_forward():
    model = tiny_model()
    ids, mask = left_pad([torch.randint(1, 512, (n,)) for n in (14, 8, 11)], pad=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        chunk = model(ids[:, 6:10], attention_mask=mask[:, :10], cache=out.cache, use_cache=True)  # 4 tokens at once
        steps = [out.logits, chunk.logits]
        for t in range(10, 14):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=chunk.cache, use_cache=True)
            steps.append(out.logits)
    real = mask.bool()
    assert (torch.cat(steps, dim=1) - full)[real].abs().max() <= LOGIT_TOL


def test_attention_mask_is_causal_after_the_cache_and_skips_padding():
    padding = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    mask = build_attention_mask(padding, q_len=2, past=3, device=padding.device)  # queries at 3 and 4
    expected = torch.tensor([[[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]],
                             [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]], dtype=torch.bool)
    assert torch.equal(mask[:, 0], expected)
    # A query on left padding sees itself only: never a fully masked row (NaN in some SDPA backends).
    mask = build_attention_mask(torch.tensor([[0, 0, 1]]), q_len=3, past=0, device="cpu")
    assert torch.equal(mask[0, 0], torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool))


def test_positions_count_real_tokens_only(monkeypatch):
    # RoPE scores depend only on position differences, so shifted positions would leave the logits unchanged
    # up to rounding: record the positions the model computes instead.
    seen, rope_cos_sin = [], transformer.rope_cos_sin

    def recording_rope(positions, *args):
        seen.append(positions.clone())
        return rope_cos_sin(positions, *args)

    monkeypatch.setattr(transformer, "rope_cos_sin", recording_rope)
    model = tiny_model()
    ids, mask = left_pad([torch.randint(1, 512, (n,)) for n in (4, 2)], pad=0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        model(ids[:, :1], attention_mask=F.pad(mask, (0, 1), value=1), cache=out.cache)
    assert seen[0].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]  # the same angles as the unpadded prompts
    assert seen[1].tolist() == [[4], [2]]


# (c) batched left-padded generation ------------------------------------------------------------------------
def test_generate_batched_left_padding_equals_unbatched():
    model = tiny_model(seed=1)
    prompts = [torch.randint(1, 512, (n,)) for n in (7, 3, 5)]
    ids, mask = left_pad(prompts, pad=0)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[i, ids.shape[1]:], single[0, len(p):]), i


def test_generate_equals_manual_argmax_loop_without_cache():
    model = tiny_model(seed=2)
    ids = torch.randint(0, 512, (1, 6))
    gen = model.generate(ids, max_new_tokens=6, do_sample=False)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(gen, seq)


def test_padded_vocab_is_never_predicted():
    model = tiny_model(vocab_size=509)  # embedding padded to 512 rows
    assert model.model.embed_tokens.num_embeddings == 512
    with torch.no_grad():
        model.lm_head.weight[509:] = 10.0  # padding rows that would win every argmax
    logits = model(torch.randint(0, 509, (1, 6))).logits
    assert (logits[..., 509:] == torch.finfo(torch.float32).min).all()
    assert (logits[..., :509].argmax(-1) == logits.argmax(-1)).all()


# (d) loss and gradient checkpointing -----------------------------------------------------------------------
def test_loss_matches_full_cross_entropy_with_ignore_and_padding():
    model = tiny_model()
    model.loss_chunk_size = 7  # several chunks, the last one partial
    ids, mask = left_pad([torch.randint(1, 512, (n,)) for n in (12, 9, 5)], pad=0)
    labels = ids.clone()
    labels[0, 4:6] = -100
    out = model(ids, attention_mask=mask, labels=labels, return_logits=True)
    targets = labels.masked_fill(mask == 0, -100)[:, 1:]
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-5, rtol=1e-5)
    counted = int((targets != -100).sum())
    total = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=100).loss * 100
    assert torch.allclose(total, expected * counted, rtol=1e-5)
    assert model(ids, attention_mask=mask, labels=labels).logits is None  # no logits unless asked


def test_gradient_checkpointing_gives_same_gradients():
    ids = torch.randint(0, 512, (2, 20))

    def grads_and_layer_calls(checkpointing):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        calls = []
        for layer in model.model.layers:
            layer.input_layernorm.register_forward_pre_hook(lambda *_: calls.append(1))
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads_and_layer_calls(False)
    ckpt, ckpt_calls = grads_and_layer_calls(True)
    assert (plain_calls, ckpt_calls) == (2, 4)  # checkpointing recomputes each layer in the backward
    for name, g in plain.items():
        assert torch.allclose(ckpt[name], g, atol=1e-6, rtol=1e-5), name
    built = MoaiTransformerForCausalLM(get_transformer_config("tiny", use_checkpoint=True))
    assert all(layer.gradient_checkpointing for layer in built.model.layers)


# (e) preset sizes vs the Mamba presets ---------------------------------------------------------------------
def count_params(model_cls, config):
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


@pytest.mark.parametrize("name", preset_names())
def test_preset_matches_mamba_preset_size(name):
    cfg, mamba_cfg = get_transformer_config(name), get_mamba_config(name)
    # Same width, depth, vocabulary and tying, so speed/memory comparisons change only the mixer.
    for field in ("hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings"):
        assert getattr(cfg, field) == getattr(mamba_cfg, field), field
    if mamba_cfg.hidden_size >= 2048:
        assert cfg.head_dim == 128
    ours = count_params(MoaiTransformerForCausalLM, cfg)
    theirs = count_params(MoaiMambaForCausalLM, mamba_cfg)
    assert abs(ours / theirs - 1) <= PARAM_COUNT_REL_TOL, (ours, theirs)


def test_preset_registry():
    cfg = get_transformer_config("2b")
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (16, 8, 128)
    assert get_transformer_config("tiny", num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(ConfigError, match="unknown transformer preset 'huge'.*tiny, 130m"):
        get_transformer_config("huge")


# (f) config and input errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=100, num_attention_heads=3), "hidden_size=100 is not divisible by num_attention_heads=3"),
    (dict(num_attention_heads=4, num_key_value_heads=3),
     r"num_key_value_heads=3 must divide num_attention_heads=4.*valid values: \[1, 2, 4\]"),
    (dict(head_dim=15), "head_dim must be even for RoPE"),
    (dict(head_dim=0), "head_dim must be None or an integer > 0, got 0"),
    (dict(vocab_size=0), "vocab_size must be an integer > 0, got 0"),
    (dict(intermediate_size=2.5), "intermediate_size must be an integer > 0, got 2.5"),
    (dict(rope_theta=0.5), "rope_theta must be a number > 1"),
    (dict(rms_norm_eps=0), r"rms_norm_eps must be in \(0, 1\)"),
    (dict(pad_token_id=600), r"pad_token_id=600 is outside the vocabulary \[0, 512\)"),
])
def test_bad_config_raises_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        get_transformer_config("tiny", **overrides)


def test_head_dim_defaults_and_survives_save_load(tmp_path):
    cfg = MoaiTransformerConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                num_attention_heads=3)
    assert (cfg.head_dim, cfg.num_key_value_heads) == (16, 3)
    model = tiny_model(tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    loaded = MoaiTransformerForCausalLM.from_pretrained(tmp_path).eval()
    for field in ("head_dim", "num_key_value_heads", "rope_theta", "intermediate_size", "tie_word_embeddings"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("ids", [
    torch.tensor([[1, 2, 600]]), torch.tensor([[-1, 2]]), torch.tensor([1, 2, 3]), torch.zeros(1, 0, dtype=torch.long),
], ids=["too-large", "negative", "1-d", "empty"])
def test_bad_input_ids_give_the_same_errors_as_mamba(ids):
    with pytest.raises(ValueError) as ours:
        tiny_model()(ids)
    with pytest.raises(ValueError) as mamba:
        MoaiMambaForCausalLM(get_mamba_config("tiny"))(ids)
    assert str(ours.value) == str(mamba.value)


def test_attention_mask_of_wrong_length_is_an_error():
    model = tiny_model()
    out = model(torch.randint(0, 512, (1, 4)), use_cache=True)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, cached \+ new tokens\) = \(1, 5\)"):
        model(torch.tensor([[3]]), attention_mask=torch.ones(1, 1), cache=out.cache)
