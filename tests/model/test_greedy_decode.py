"""`greedy_decode` (eager and CUDA-graph) against HF `generate`: same greedy tokens."""

import pytest
import torch

from moai_lib.config import get_mamba_config
from moai_lib.model.generate import CudaGraphDecoder, greedy_decode
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
