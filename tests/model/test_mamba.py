"""The Mamba LM: shapes, initialisation, decoding with the recurrent cache, generate, loss, checkpointing,
save/load and bad input. Conformance with HF Mamba and mamba-ssm lives in test_conformance.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from moai_lib import MoaiMambaCache, MoaiMambaForCausalLM, get_mamba_config

# Decode-vs-forward tolerance (max abs logit difference) per dtype: the step path and the scan path sum in
# different orders, in fp32 for the state in both cases; bf16 adds rounding of the activations.
DECODE_TOL = {torch.float32: 1e-4, torch.bfloat16: 0.15}


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = get_mamba_config("tiny", **overrides)
    model = MoaiMambaForCausalLM(cfg).eval()
    # Spread the SSM parameters away from their init values so that bugs in A/D/dt handling show up.
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.A_log.add_(0.3 * torch.randn_like(layer.mixer.A_log))
            layer.mixer.D.add_(0.5 * torch.randn_like(layer.mixer.D))
            layer.norm.weight.add_(0.2 * torch.randn_like(layer.norm.weight))
    return model


def test_forward_shapes_and_param_names():
    model = tiny_model()
    ids = torch.randint(0, 512, (3, 11))
    out = model(ids, use_cache=False)
    assert out.logits.shape == (3, 11, 512)
    assert out.cache is None
    names = dict(model.named_parameters())
    for key in ("backbone.embedding.weight", "backbone.layers.0.mixer.in_proj.weight",
                "backbone.layers.0.mixer.conv1d.weight", "backbone.layers.0.mixer.x_proj.weight",
                "backbone.layers.0.mixer.dt_proj.bias", "backbone.layers.0.mixer.A_log",
                "backbone.layers.0.mixer.D", "backbone.layers.0.mixer.out_proj.weight",
                "backbone.layers.1.norm.weight", "backbone.layers.1.norm2.weight",
                "backbone.layers.1.mlp.fc1.weight", "backbone.layers.1.mlp.fc2.weight", "backbone.norm_f.weight"):
        assert key in names, key
    assert model.lm_head.weight is model.backbone.embedding.weight  # tiny ties embeddings


def test_no_mlp_when_intermediate_size_zero():
    model = tiny_model(intermediate_size=0)
    assert all(layer.mlp is None and layer.norm2 is None for layer in model.backbone.layers)
    assert not any(".mlp." in n for n, _ in model.named_parameters())


def test_mamba_initialisation():
    torch.manual_seed(0)
    cfg = get_mamba_config("tiny", num_hidden_layers=4)
    mixer = MoaiMambaForCausalLM(cfg).backbone.layers[0].mixer
    n = cfg.state_size
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(cfg.d_inner, 1))
    assert torch.equal(mixer.D, torch.ones(cfg.d_inner))
    dt0 = F.softplus(mixer.dt_proj.bias)  # initial step sizes: log-uniform in [dt_min, dt_max]
    assert dt0.min() >= cfg.dt_min * 0.999 and dt0.max() <= cfg.dt_max * 1.001
    assert dt0.max() / dt0.min() > 10  # spread over the range, not constant
    std = cfg.time_step_rank ** -0.5
    assert mixer.dt_proj.weight.abs().max() <= std
    # Residual rescale: out_proj bound 1/sqrt(E) / sqrt(2 residual adds × 4 layers).
    bound = 1 / math.sqrt(cfg.d_inner) / math.sqrt(2 * 4)
    assert mixer.out_proj.weight.abs().max() <= bound
    assert mixer.out_proj.weight.abs().max() > 0.8 * bound


def test_a_log_and_d_stay_fp32_in_bf16():
    model = tiny_model().to(torch.bfloat16)
    mixer = model.backbone.layers[0].mixer
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32
    assert mixer.in_proj.weight.dtype == torch.bfloat16
    out = model(torch.randint(0, 512, (1, 5)))
    assert out.cache.ssm_states[0].dtype == torch.float32
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_by_token_decoding_matches_full_forward(dtype):
    model = tiny_model().to(dtype)
    ids = torch.randint(0, 512, (2, 23))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        prefill = 7
        out = model(ids[:, :prefill], use_cache=True)
        steps = [out.logits[:, -1]]
        cache = out.cache
        for t in range(prefill, ids.shape[1] - 1):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    stepped = torch.stack(steps, dim=1)
    diff = (stepped - full[:, prefill - 1:-1]).abs().max().item()
    assert diff <= DECODE_TOL[dtype], diff


def test_multi_token_continuation_from_cache():
    """A chunk of several tokens fed after a prefill continues from the cached conv and SSM state."""
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :12], use_cache=True)
        out2 = model(ids[:, 12:], cache=out.cache, use_cache=True)
    assert (out2.logits - full[:, 12:]).abs().max() < 1e-4
    assert out2.cache.seqlen_offset == 30


def test_cache_size_does_not_grow_with_context():
    model = tiny_model()
    sizes = []
    with torch.no_grad():
        for length in (4, 64, 256):
            cache = model(torch.randint(0, 512, (1, length)), use_cache=True).cache
            sizes.append(cache.nbytes())
            cache = model(torch.randint(0, 512, (1, 1)), cache=cache, use_cache=True).cache
            sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1
    cfg = model.config
    expected = cfg.num_hidden_layers * cfg.d_inner * ((cfg.conv_kernel_size - 1) + cfg.state_size) * 4
    assert sizes[0] == expected


def test_generate_greedy_equals_manual_argmax_loop():
    model = tiny_model()
    ids = torch.randint(0, 512, (1, 6))
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(gen, seq)


def test_generate_batched_left_padding_equals_unbatched():
    model = tiny_model()
    pad = 0
    prompts = [torch.randint(1, 512, (n,)) for n in (3, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), pad)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=6, do_sample=False, pad_token_id=pad)
        assert torch.equal(batched[i, width:], single[0, len(p):]), i


def test_generate_stops_on_eos_and_samples_reproducibly():
    model = tiny_model()
    ids = torch.randint(0, 512, (1, 5))
    greedy = model.generate(ids, max_new_tokens=10, do_sample=False)
    eos = int(greedy[0, 7])  # the third generated token
    stopped = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    assert stopped.shape[1] <= 5 + 3 and stopped[0, -1] == eos
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(123)
    a = model.generate(ids, **kwargs)
    torch.manual_seed(123)
    b = model.generate(ids, **kwargs)
    assert torch.equal(a, b) and a.shape == (1, 17)
    assert ((a[0, 5:] >= 0) & (a[0, 5:] < model.config.vocab_size)).all()


def test_padded_vocab_is_never_predicted():
    model = tiny_model(vocab_size=509)  # padded to 512
    assert model.config.padded_vocab_size == 512
    logits = model(torch.randint(0, 509, (1, 4))).logits
    assert logits.shape[-1] == 512
    assert (logits[..., 509:].max(-1).values < logits[..., :509].min(-1).values).all()


def test_loss_matches_full_cross_entropy_with_ignore_and_padding():
    model = tiny_model()
    model.loss_chunk_size = 7  # several chunks, the last one partial
    ids = torch.randint(0, 512, (2, 13))
    labels = ids.clone()
    labels[0, 4] = -100
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    out = model(ids, attention_mask=mask, labels=labels, return_logits=True)
    logits = model(ids, attention_mask=mask, use_cache=False).logits
    targets = labels.masked_fill(mask == 0, -100)[:, 1:]
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 512), targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, ref, atol=1e-5)
    assert torch.allclose(out.logits, logits)
    assert model(ids, labels=labels).logits is None  # no full logits unless asked

    # Gradients through the chunked loss equal those of the full cross-entropy.
    model.zero_grad()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids, attention_mask=mask, use_cache=False).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, 512), targets.reshape(-1), ignore_index=-100).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-4), n


def test_loss_num_items_in_batch_and_all_ignored():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 9))
    mean = model(ids, labels=ids).loss
    summed = model(ids, labels=ids, num_items_in_batch=1).loss
    assert torch.allclose(summed, mean * 2 * 8, rtol=1e-5)
    none = model(ids, labels=torch.full_like(ids, -100)).loss
    assert none.item() == 0.0


def test_gradient_checkpointing_gives_same_gradients():
    model = tiny_model().train()
    ids = torch.randint(0, 512, (2, 17))
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.backbone.layers)
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(ref[n], p.grad, atol=1e-6, rtol=1e-5), n
    assert MoaiMambaForCausalLM(get_mamba_config("tiny", use_checkpoint=True)).backbone.layers[0].gradient_checkpointing


def test_save_and_load_with_auto_classes(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert cfg.model_type == "moai_mamba"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MoaiMambaForCausalLM)
    ids = torch.randint(0, 512, (2, 10))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.backbone.layers[0].mixer.A_log.dtype == torch.float32
    assert torch.equal(bf16.backbone.layers[0].mixer.A_log, model.backbone.layers[0].mixer.A_log)


def test_resize_token_embeddings_for_added_tokens():
    model = tiny_model(vocab_size=500)
    model.resize_token_embeddings(530, pad_to_multiple_of=8)
    assert model.backbone.embedding.num_embeddings == 536
    assert model(torch.tensor([[529]])).logits.shape[-1] == 536


def test_cache_reorder_and_repeat():
    model = tiny_model()
    cache = model(torch.randint(0, 512, (2, 5)), use_cache=True).cache
    first = cache.ssm_states[0][0].clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.ssm_states[0][1], first)
    cache.batch_repeat_interleave(3)
    assert cache.ssm_states[0].shape[0] == 6 and cache.conv_states[1].shape[0] == 6
    assert isinstance(cache, MoaiMambaCache) and cache.get_seq_length() == 5


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.tensor([[1, 2, 512]]), "outside the model's vocabulary"),
        (torch.tensor([[-1, 2]]), "outside the model's vocabulary"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        (torch.tensor([1, 2, 3]), "shape (batch, seq_len)"),
    ],
)
def test_bad_input_ids_give_clear_errors(ids, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model(ids)


def test_bad_labels_give_clear_error():
    model = tiny_model()
    ids = torch.randint(0, 512, (1, 6))
    with pytest.raises(ValueError, match="labels contain ids outside"):
        model(ids, labels=torch.full_like(ids, 900))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the GPU machine)")
def test_cuda_bf16_model_matches_fp32_cpu_and_decodes():
    """The whole model on the GPU (auto backend) in bf16 agrees with fp32 on CPU, and decoding matches."""
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 300))
    ref = model(ids, use_cache=False).logits
    gpu = tiny_model().to("cuda", torch.bfloat16)
    got = gpu(ids.cuda(), use_cache=False).logits.float().cpu()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.05, rel
    out = gpu.generate(ids[:, :20].cuda(), max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 28)
