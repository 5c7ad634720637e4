"""bitsandbytes variants through the pipeline's stages on the tiny profile: `quantize` saves the NF4 / LLM.int8
layers (not a float model), `evaluate` loads them quantized, `export` reloads them quantized."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_helpers import make_root, tiny_params

from moai_lib.pipeline import PipelineParams
from moai_lib.pipeline.evaluation import load_variant, safetensors_entries
from moai_lib.pipeline.stages import run_stage

bnb = pytest.importorskip("bitsandbytes")

METHODS = {"nf4": {"method": "bnb", "quant_type": "nf4"}, "int8": {"method": "bnb", "quant_type": "int8"}}
LAYER_TYPE = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}
KIND = {"nf4": "bnb4", "int8": "bnb8"}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A tiny run root (quantize.methods: nf4 and int8 only) after tokenize, pretrain, quantize, evaluate and
    export of the bf16, nf4 and int8 variants."""
    data = tiny_params()
    data["quantize"]["methods"] = METHODS
    params = PipelineParams.load(make_root(tmp_path_factory.mktemp("bnb_run"), data) / "params.yaml")
    results = {"tokenize": run_stage("tokenize", params), "pretrain": run_stage("pretrain", params)}
    for method in METHODS:
        results[f"quantize_{method}"] = run_stage("quantize", params, method=method)
    for variant in ("bf16", *METHODS):
        results[f"evaluate_{variant}"] = run_stage("evaluate", params, variant=variant)
        results[f"export_{variant}"] = run_stage("export", params, variant=variant)
    return params, results


def layer_bytes(model_dir, layers) -> int:
    """Bytes stored for `layers` (their weights and, when quantized, bitsandbytes' statistics)."""
    return sum(b for name, (b, _) in safetensors_entries(model_dir).items() if name.rsplit(".", 1)[0] in layers)


@pytest.mark.parametrize("method", list(METHODS))
def test_quantize_saves_the_quantized_layers(done, method):
    params, results = done
    model_dir = params.path("quantized_model", method=method)
    assert not (model_dir / "quantize_on_load.json").exists()
    modules = json.loads((model_dir / "config.json").read_text())["quantization_config"]["modules"]
    assert len(modules) == 5 and {v["kind"] for v in modules.values()} == {KIND[method]}
    float_dir = params.path("pretrain_model")
    assert layer_bytes(model_dir, modules) < layer_bytes(float_dir, modules) / (6 if method == "nf4" else 3)
    assert results[f"evaluate_{method}"]["size_bytes"] < results["evaluate_bf16"]["size_bytes"]
    assert results[f"quantize_{method}"]["method"] == "bnb"


@pytest.mark.parametrize("method", list(METHODS))
def test_evaluate_and_export_load_it_quantized(done, method):
    params, results = done
    ev, bf16 = results[f"evaluate_{method}"], results["evaluate_bf16"]
    assert ev["method"] == "bnb" and ev["quantized_layers"] == 5
    assert ev["bits_per_weight"] < (5 if method == "nf4" else 9) < bf16["bits_per_weight"]
    assert ev["ppl"] == pytest.approx(bf16["ppl"], rel=0.05)
    for model_dir in (params.path("model", variant=method), params.path("export", variant=method)):
        model = load_variant(model_dir)
        mixer = model.backbone.layers[0].mixer
        assert isinstance(mixer.in_proj, LAYER_TYPE[method]) and isinstance(mixer.out_proj, LAYER_TYPE[method])
    card = (params.path("export", variant=method) / "README.md").read_text()
    assert "quantized-bnb" in card and "- `bnb` on 5 layers: " in card and f"quant_type={method}\n" in card


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the GPU machine)")
@pytest.mark.parametrize("method", list(METHODS))
def test_variant_moved_to_cuda_computes_what_it_computes_on_cpu(done, method):
    """`load_variant(device="cuda")` loads on the CPU, then moves the model: the bitsandbytes statistics (NF4's
    quant_state, LLM.int8's CB/SCB) must move with the weights."""
    params, _ = done
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for device in ("cpu", "cuda"):
        model = load_variant(params.path("model", variant=method), device=device)
        with torch.no_grad():
            logits[device] = model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()
    assert torch.allclose(logits["cuda"], logits["cpu"], rtol=1e-2, atol=1e-2)
