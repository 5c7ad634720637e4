"""Conformance with independent implementations, on copied weights, in fp32.

(a) HF transformers `MambaForCausalLM` (no MLP): our MLP-free model exported with `export_to_hf_mamba` and
    loaded by HF's `from_pretrained`, or mapped state dict → state dict, gives the same logits, the same decoding
    logits and the same greedy generation; HF's own `save_pretrained` output loads back through
    `load_external_checkpoint`.
(b) state-spaces/mamba `MambaLMHeadModel` with a gated MLP (`d_intermediate > 0`), run through its pure-torch
    reference path (fixture `mamba_ssm_cpu` in conftest.py): same logits, same step-by-step decoding, and its
    checkpoint directories load both ways.

The weights are random with A_log, D, every norm weight, the dt bias and the conv bias moved away from their init
values, so a model that ignored any of them (or mixed up [x; z], [dt; B; C] or the MLP gate half) would differ by
far more than the tolerance; `test_hf_direct_state_dict_mapping` checks that such a change is visible.
"""

import dataclasses

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from moai_lib import MoaiMambaConfig, MoaiMambaForCausalLM
from moai_lib.model.convert import (
    ConversionError,
    config_from_mamba_ssm,
    config_to_hf_mamba,
    export_to_hf_mamba,
    load_external_checkpoint,
    save_mamba_ssm_checkpoint,
    state_dict_to_hf_mamba,
)

# Max abs logit difference per dtype between two implementations of the same fp32 math (different summation
# orders); one wrong parameter moves the logits by ~1e-1 or more.
LOGIT_TOL = {torch.float32: 1e-4}
HIDDEN, LAYERS, VOCAB = 64, 3, 256
NEW_TOKENS = 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: intra-op threads only add synchronisation (very costly on a loaded 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb_(model: torch.nn.Module, seed: int = 1) -> None:
    """Move the SSM parameters and norms off their init values (same rule for our and the reference models)."""
    gen = torch.Generator().manual_seed(seed)
    scale = {"A_log": 0.3, "D": 0.5, "norm.weight": 0.2, "norm2.weight": 0.2, "norm_f.weight": 0.2,
             "dt_proj.bias": 0.5, "conv1d.bias": 0.2}
    with torch.no_grad():
        for name, p in model.named_parameters():
            for suffix, s in scale.items():
                if name.endswith(suffix):
                    p.add_(s * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                    break


def moai_model(*, tie: bool, intermediate_size: int = 0, vocab_size: int = VOCAB, seed: int = 0):
    torch.manual_seed(seed)
    cfg = MoaiMambaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                          intermediate_size=intermediate_size, tie_word_embeddings=tie)
    model = MoaiMambaForCausalLM(cfg).eval()
    perturb_(model)
    return model


def prompt(batch: int = 2, length: int = 12, vocab: int = VOCAB, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    diff = (ours.float() - theirs.float()).abs().max().item()
    assert diff <= LOGIT_TOL[torch.float32], f"{what}: max abs diff {diff:.3g} > {LOGIT_TOL[torch.float32]}"


def assert_nontrivial(logits: torch.Tensor) -> None:
    # The comparison means something only if the logits depend on the input and are not tiny.
    assert logits.std() > 0.1 and (logits[:, -1] - logits[:, 0]).abs().max() > 0.1


def assert_same_greedy_generation(model, hf, ids):
    """HF `generate` on both: prefill, then recurrent decoding steps; same tokens, same logits at every step."""
    hf.generation_config.eos_token_id = None  # HF's default eos 0 would stop generation early
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True,
               attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        ours = model.generate(ids, **gen)
        theirs = hf.generate(ids, **gen)
    assert ours.sequences.shape == (ids.shape[0], ids.shape[1] + NEW_TOKENS)
    assert torch.equal(ours.sequences, theirs.sequences)
    for step, (a, b) in enumerate(zip(ours.logits, theirs.logits, strict=True)):
        assert_close(a, b, f"decoding step {step} logits vs HF")


# (a) HF transformers MambaForCausalLM -------------------------------------------------------------------------
@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def tie(request):
    return request.param


def test_hf_from_pretrained_matches(tie, tmp_path):
    model = moai_model(tie=tie)
    export_to_hf_mamba(model, tmp_path / "hf")
    hf = MambaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.vocab_size == VOCAB and hf.config.intermediate_size == 2 * HIDDEN
    assert (hf.lm_head.weight is hf.backbone.embeddings.weight) == tie
    assert hf.config.eos_token_id is None  # exported from our config (HF's default would be 0)
    # Every tensor arrives unchanged (transformers 5.24 rescales out_proj on load if rescale_prenorm_residual).
    hf_sd = hf.state_dict()
    for name, tensor in state_dict_to_hf_mamba(model.state_dict()).items():
        assert torch.equal(hf_sd[name], tensor), name
    ids = prompt()
    with torch.no_grad():
        ours = model(ids, use_cache=False).logits
        theirs = hf(ids, use_cache=False).logits
    assert_nontrivial(ours)
    assert_close(ours, theirs, "logits vs HF MambaForCausalLM")
    assert_same_greedy_generation(model, hf, ids)


def test_hf_direct_state_dict_mapping(tie):
    model = moai_model(tie=tie)
    hf = MambaForCausalLM(MambaConfig(**config_to_hf_mamba(model.config))).eval()
    hf.load_state_dict(state_dict_to_hf_mamba(model.state_dict()), strict=True)
    ids = prompt()
    assert_same_greedy_generation(model, hf, ids)
    with torch.no_grad():
        ours = model(ids, use_cache=False).logits
        assert_close(ours, hf(ids, use_cache=False).logits, "logits vs HF (state-dict mapping)")
        # The test can fail: a small change to one layer's D is far above the tolerance.
        hf.backbone.layers[1].mixer.D.add_(0.05)
        moved = (hf(ids, use_cache=False).logits - ours).abs().max().item()
    assert moved > 100 * LOGIT_TOL[torch.float32]


def test_hf_checkpoint_loads_back(tie, tmp_path):
    model = moai_model(tie=tie)
    export_to_hf_mamba(model, tmp_path / "export")
    hf = MambaForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "hf")  # HF's own writer: backbone.embeddings.*, tied lm_head left out
    loaded = load_external_checkpoint(tmp_path / "hf")
    assert loaded.config.tie_word_embeddings == tie and loaded.config.intermediate_size == 0
    assert (loaded.lm_head.weight is loaded.backbone.embedding.weight) == tie
    ours_sd, loaded_sd = model.state_dict(), loaded.state_dict()
    assert ours_sd.keys() == loaded_sd.keys()
    for name, tensor in ours_sd.items():
        assert torch.equal(tensor, loaded_sd[name]), name
    ids = prompt()
    with torch.no_grad():
        assert_close(loaded(ids, use_cache=False).logits, hf(ids, use_cache=False).logits, "reloaded vs HF")


# (b) state-spaces/mamba MambaLMHeadModel with a gated MLP ------------------------------------------------------
SSM_VOCAB = 250  # not a multiple of 8: both sides pad the embedding to 256


def mamba_ssm_reference(ms, *, tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ms.MambaConfig(d_model=HIDDEN, n_layer=LAYERS, d_intermediate=128, vocab_size=SSM_VOCAB,
                         ssm_cfg={"layer": "Mamba1"}, rms_norm=True, residual_in_fp32=True, fused_add_norm=False,
                         pad_vocab_size_multiple=8, tie_embeddings=tie)
    ref = ms.MambaLMHeadModel(cfg).eval()
    perturb_(ref)
    return ref


def moai_copy_of(ref) -> MoaiMambaForCausalLM:
    """Our model with mamba-ssm's weights copied in (names are the same)."""
    ours = MoaiMambaForCausalLM(config_from_mamba_ssm(dataclasses.asdict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def test_mamba_ssm_logits_match(mamba_ssm_cpu, tie):
    ref = mamba_ssm_reference(mamba_ssm_cpu, tie=tie)
    ours = moai_copy_of(ref)
    assert ours.config.intermediate_size == 128 and ours.config.padded_vocab_size == 256
    assert all(layer.mlp is not None for layer in ours.backbone.layers)
    ids = prompt(vocab=SSM_VOCAB)
    with torch.no_grad():
        theirs = ref(ids).logits
        mine = ours(ids, use_cache=False).logits
    assert theirs.shape == mine.shape == (2, 12, 256)
    assert_nontrivial(mine[..., :SSM_VOCAB])
    assert_close(mine[..., :SSM_VOCAB], theirs[..., :SSM_VOCAB], "logits vs mamba-ssm MambaLMHeadModel")
    assert (mine[..., SSM_VOCAB:] == torch.finfo(torch.float32).min).all()  # we never predict padding ids


@pytest.mark.parametrize("state_update", ["inline", "selective_state_update_ref"])
def test_mamba_ssm_step_decoding_matches(mamba_ssm_cpu, monkeypatch, state_update):
    """Prefill then one token at a time through both recurrent caches (mamba-ssm's `Mamba.step`)."""
    ms = mamba_ssm_cpu
    calls = {"step": 0, "state_update": 0}
    if state_update == "selective_state_update_ref":
        def counted_update(*args, **kwargs):
            calls["state_update"] += 1
            return ms.selective_state_update_ref(*args, **kwargs)
        monkeypatch.setattr(ms.mamba_simple, "selective_state_update", counted_update)
    step = ms.Mamba.step

    def counted_step(self, *args):
        calls["step"] += 1
        return step(self, *args)

    monkeypatch.setattr(ms.Mamba, "step", counted_step)
    ref = mamba_ssm_reference(ms, tie=False)
    ours = moai_copy_of(ref)
    ids = prompt(vocab=SSM_VOCAB)
    params = ms.InferenceParams(max_seqlen=ids.shape[1] + NEW_TOKENS, max_batch_size=ids.shape[0])
    with torch.no_grad():
        theirs = ref(ids, inference_params=params).logits[:, -1, :SSM_VOCAB]
        params.seqlen_offset += ids.shape[1]
        out = ours(ids, use_cache=True)
        for i in range(NEW_TOKENS):
            mine = out.logits[:, -1, :SSM_VOCAB]
            assert_close(mine, theirs, f"decoding step {i} vs mamba-ssm")
            token = mine.argmax(-1, keepdim=True)
            assert torch.equal(token, theirs.argmax(-1, keepdim=True))
            theirs = ref(token, inference_params=params).logits[:, -1, :SSM_VOCAB]
            params.seqlen_offset += 1
            out = ours(token, cache=out.cache, use_cache=True)
    assert calls["step"] == NEW_TOKENS * LAYERS  # mamba-ssm really decoded step by step
    assert calls["state_update"] == (NEW_TOKENS * LAYERS if state_update != "inline" else 0)


def test_mamba_ssm_directory_loads(mamba_ssm_cpu, tie, tmp_path):
    ref = mamba_ssm_reference(mamba_ssm_cpu, tie=tie)
    ref.save_pretrained(str(tmp_path))  # mamba-ssm's writer: config.json + pytorch_model.bin (pickle)
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin, a pickle file.*allow_pickle=True"):
        load_external_checkpoint(tmp_path)
    ours = load_external_checkpoint(tmp_path, allow_pickle=True)
    assert ours.config.tie_word_embeddings == tie
    ids = prompt(vocab=SSM_VOCAB)
    with torch.no_grad():
        assert_close(ours(ids, use_cache=False).logits[..., :SSM_VOCAB], ref(ids).logits[..., :SSM_VOCAB],
                     "loaded mamba-ssm checkpoint vs mamba-ssm")


def test_save_mamba_ssm_checkpoint_loads_in_mamba_ssm(mamba_ssm_cpu, tmp_path):
    ms = mamba_ssm_cpu
    ours = moai_model(tie=True, intermediate_size=128, vocab_size=SSM_VOCAB)
    save_mamba_ssm_checkpoint(ours, tmp_path, write_pytorch_bin=True, fused_add_norm=False)
    ref = ms.MambaLMHeadModel.from_pretrained(str(tmp_path)).eval()  # mamba-ssm's reader: pytorch_model.bin
    assert ref.lm_head.weight is ref.backbone.embedding.weight
    ids = prompt(vocab=SSM_VOCAB)
    with torch.no_grad():
        mine = ours(ids, use_cache=False).logits[..., :SSM_VOCAB]
        assert_close(mine, ref(ids).logits[..., :SSM_VOCAB], "saved for mamba-ssm vs mamba-ssm")
        # The safetensors copy alone (no pickle) loads back to the same model.
        (tmp_path / "pytorch_model.bin").unlink()
        reloaded = load_external_checkpoint(tmp_path)
        assert_close(reloaded(ids, use_cache=False).logits[..., :SSM_VOCAB], mine, "reloaded vs original")
