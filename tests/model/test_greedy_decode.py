"""`greedy_decode` (eager and CUDA-graph) against HF `generate`: same greedy tokens."""

import pytest
import torch

from moai_lib.config import get_mamba_config
from moai_lib.model.generate import CudaGraphDecoder, CudaGraphPrefill, greedy_decode
from moai_lib.model.mamba import MoaiMambaForCausalLM


def _model(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return MoaiMambaForCausalLM(get_mamba_config("tiny")).to(device, dtype).eval()


def test_greedy_decode_equals_hf_generate():
    model = _model()
    prompt = torch.randint(0, 512, (3, 7), generator=torch.Generator().manual_seed(1))
    ours = greedy_decode(model, prompt, 12)
    hf = model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 7:]
    assert torch.equal(ours, hf)


def test_greedy_decode_rejects_nonpositive_length():
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(_model(), torch.zeros(1, 3, dtype=torch.long), 0)


def test_cuda_graph_decoder_needs_cuda():
    model = _model()
    with torch.inference_mode():
        cache = model(input_ids=torch.zeros(1, 3, dtype=torch.long), use_cache=True).cache
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphDecoder(model, cache)


def test_cuda_graph_prefill_needs_cuda():
    with pytest.raises(ValueError, match="CudaGraphPrefill needs the model on a CUDA GPU"):
        CudaGraphPrefill(_model(), 1, 8)


def test_graph_launches_split_the_scan_from_2k():
    """Under a CUDA graph (its capture, or the warm-up before it) a batch-narrow scan splits over L from 2K tokens
    on; eagerly from 4K (the extra launches cost Python time there, nothing at replay)."""
    from moai_lib.kernels.triton_scan_seg import graph_launches, segment_len_for

    assert segment_len_for(1, 2048, 2048) == 0 and segment_len_for(1, 2048, 4096) > 0
    with graph_launches():
        assert segment_len_for(1, 2048, 2048) > 0 and segment_len_for(1, 2048, 1024) == 0
        assert segment_len_for(64, 4096, 2048) == 0  # wide batches never split
    assert segment_len_for(1, 2048, 2048) == 0


def test_cuda_graph_decoder_load_takes_over_a_prefill():
    """`load` (what lets one captured graph serve the next prompt) copies every state of the new prefill into the
    graph's own cache tensors, in place, and refuses a cache of another batch size. The graph itself needs CUDA
    (test below); the copy is checked here on an instance whose cache is a CPU one."""
    model = _model()
    with torch.inference_mode():
        own = model(input_ids=torch.zeros(2, 3, dtype=torch.long), use_cache=True).cache
        new = model(input_ids=torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(3)),
                    use_cache=True).cache
        decoder = object.__new__(CudaGraphDecoder)
        decoder.cache = own
        addresses = [t.data_ptr() for t in own.conv_states + own.ssm_states]
        decoder.load(new)
        assert [t.data_ptr() for t in own.conv_states + own.ssm_states] == addresses  # the graph's tensors
        for a, b in zip(own.conv_states + own.ssm_states, new.conv_states + new.ssm_states, strict=True):
            assert torch.equal(a, b)
        assert own.seqlen_offset == new.seqlen_offset == 5
        other = model(input_ids=torch.zeros(3, 2, dtype=torch.long), use_cache=True).cache
        with pytest.raises(ValueError, match="batch size 2"):
            decoder.load(other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_decode_equals_eager(backend):
    torch.manual_seed(0)
    model = MoaiMambaForCausalLM(get_mamba_config("tiny", kernel_backend=backend)).to("cuda").eval()
    prompt = torch.randint(0, 512, (2, 9), device="cuda")
    eager = greedy_decode(model, prompt, 16)
    assert torch.equal(greedy_decode(model, prompt, 16, cuda_graph=True), eager)
    # One captured decoder reused for another prompt of the same batch size (no new capture): its eager tokens.
    with torch.inference_mode():
        decoder = CudaGraphDecoder(model, model(input_ids=prompt, use_cache=True, logits_to_keep=1).cache)
    other = torch.randint(0, 512, (2, 5), device="cuda")
    assert torch.equal(greedy_decode(model, other, 16, cuda_graph=decoder), greedy_decode(model, other, 16))
    assert torch.equal(greedy_decode(model, prompt, 16, cuda_graph=decoder), eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_prefill_equals_eager(backend):
    """A captured prefill replays the eager forward: same last logits and states (short prompt: the same
    kernels), the same greedy tokens through `greedy_decode(prefill=...)`, again for a second prompt of the
    shape; another shape is refused with the fix."""
    torch.manual_seed(0)
    model = MoaiMambaForCausalLM(get_mamba_config("tiny", kernel_backend=backend)).to("cuda").eval()
    prompts = [torch.randint(0, 512, (2, 9), device="cuda") for _ in range(2)]
    with torch.inference_mode():
        prefill = CudaGraphPrefill(model, 2, 9)
        for prompt in prompts:
            logits, cache = prefill(prompt)
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            assert torch.equal(logits, out.logits) and cache.seqlen_offset == 9
            for a, b in zip(cache.conv_states + cache.ssm_states, out.cache.conv_states + out.cache.ssm_states,
                            strict=True):
                assert torch.equal(a, b)
    for prompt in prompts:
        assert torch.equal(greedy_decode(model, prompt, 12, prefill=prefill, cuda_graph=True),
                           greedy_decode(model, prompt, 12))
    with pytest.raises(ValueError, match=r"captured for prompts of shape \(2, 9\)"):
        prefill(prompts[0][:1])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):  # checked before the replay
        prefill(torch.full((2, 9), 10**6, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@torch.inference_mode()
def test_cuda_graph_prefill_splits_a_2k_prompt():
    """At batch 1 and 2K tokens the captured prefill scans in segments (the eager one does not): the same
    logits and final states up to fp32 summation order."""
    from moai_lib.kernels import triton_scan_seg

    torch.manual_seed(0)
    model = MoaiMambaForCausalLM(get_mamba_config("tiny", kernel_backend="triton")).to("cuda").eval()
    prompt = torch.randint(0, 512, (1, 2048), device="cuda")
    d_inner = model.config.d_inner
    assert triton_scan_seg.segment_len_for(1, d_inner, 2048) == 0  # eager: unsplit
    with triton_scan_seg.graph_launches():
        assert triton_scan_seg.segment_len_for(1, d_inner, 2048) > 0  # captured: split
    logits, cache = CudaGraphPrefill(model, 1, 2048)(prompt)
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    assert torch.allclose(logits, out.logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(cache.ssm_states, out.cache.ssm_states, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
