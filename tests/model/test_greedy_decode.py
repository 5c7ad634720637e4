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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_graph_decode_equals_eager(backend):
    torch.manual_seed(0)
    model = MoaiMambaForCausalLM(get_mamba_config("tiny", kernel_backend=backend)).to("cuda").eval()
    prompt = torch.randint(0, 512, (2, 9), device="cuda")
    eager = greedy_decode(model, prompt, 16)
    assert torch.equal(greedy_decode(model, prompt, 16, cuda_graph=True), eager)
