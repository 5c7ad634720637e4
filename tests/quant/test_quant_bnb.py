"""bitsandbytes NF4 / FP4 / INT8 layers on CPU, QLoRA on an NF4 base, and missing-package errors."""

import sys

import pytest
import torch
from quant_helpers import tiny_model
from safetensors.torch import load_file
from torch import nn

from moai_lib.quant import BnbConfig, QuantizationError, load_quantized, merge_qlora, prepare_qlora, quantize_
from moai_lib.quant import primitives as P

bnb = pytest.importorskip("bitsandbytes")

# Output SQNR floors (dB) of a 512 → 256 Gaussian layer on Gaussian inputs (measured: NF4 20.8, FP4 18.3,
# INT8 42.7). NF4's levels are the Gaussian's quantiles, so it beats INT4 RTN at the same block size.
BNB_SQNR_DB = {"nf4": 20.0, "fp4": 17.5, "int8": 41.5}


@pytest.mark.parametrize("quant_type", list(BNB_SQNR_DB))
def test_bnb_layers_on_cpu(quant_type):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(512, 256, bias=False))
    model.fc1.weight.data = torch.randn(256, 512)
    reference = model.fc1.weight.detach().clone()
    quantize_(model, BnbConfig(quant_type=quant_type))
    expected_type = bnb.nn.Linear8bitLt if quant_type == "int8" else bnb.nn.Linear4bit
    assert isinstance(model.fc1, expected_type)
    assert model.fc1.weight.dtype == (torch.int8 if quant_type == "int8" else torch.uint8)
    x = torch.randn(16, 512)
    assert P.sqnr(x @ reference.T, model.fc1(x)) >= BNB_SQNR_DB[quant_type]


def test_int8_layer_keeps_its_statistics_with_the_weight_when_the_model_moves():
    """`model.to(...)` reaches the layer through Module._apply: the int8 matrix (CB) and the row scales (SCB) stay
    with the weight (the device move itself runs on the GPU machine: tests/pipeline/test_bnb_variants.py)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(128, 64))
    model.eval()
    quantize_(model, BnbConfig(quant_type="int8"))
    x = torch.randn(4, 128)
    scales = model.fc1.weight.SCB.clone()  # before the first forward the statistics sit on the weight ...
    model.to("cpu").to(torch.bfloat16).float()  # dtype moves leave the int8 weight and its fp32 scales alone
    weight = model.fc1.weight
    assert isinstance(weight, bnb.nn.Int8Params) and weight.dtype == torch.int8
    assert weight.CB.data_ptr() == weight.data_ptr()
    assert weight.SCB.dtype == torch.float32 and torch.equal(weight.SCB, scales)
    before = model.fc1(x)  # ... after it, on the matmul state
    assert model.fc1.state.CB is not None and torch.equal(model.fc1.state.SCB, scales)
    model.to("cpu")
    assert model.fc1.state.CB.data_ptr() == model.fc1.weight.data_ptr() and torch.equal(model.fc1.state.SCB, scales)
    assert model.fc1.bias.dtype == torch.float32
    assert torch.equal(model.fc1(x), before)


def test_bnb_model_forward(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 10))
    reference = model(ids, use_cache=False).logits
    quantize_(model, BnbConfig(quant_type="nf4"))
    assert isinstance(model.backbone.layers[0].mixer.in_proj, bnb.nn.Linear4bit)
    assert type(model.backbone.layers[0].mixer.dt_proj) is nn.Linear
    assert P.sqnr(reference, model(ids, use_cache=False).logits) >= 8.0  # measured 11.7 (NF4 block 64)


@pytest.mark.parametrize("config", [BnbConfig(quant_type="nf4"), BnbConfig(quant_type="fp4", blocksize=128),
                                    BnbConfig(quant_type="nf4", double_quant=True),
                                    BnbConfig(quant_type="int8"), BnbConfig(quant_type="int8", int8_threshold=6.0)],
                         ids=["nf4", "fp4-b128", "nf4-double-quant", "int8", "int8-outliers"])
def test_bnb_save_load_stays_quantized_bit_for_bit(tmp_path, config):
    model = tiny_model()
    quantize_(model, config)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    expected_type = bnb.nn.Linear8bitLt if config.quant_type == "int8" else bnb.nn.Linear4bit
    weight_dtype = torch.int8 if config.quant_type == "int8" else torch.uint8
    # Stored quantized: the packed/int8 weight and bitsandbytes' statistics, no float copy of the weight.
    assert stored["backbone.layers.0.mixer.in_proj.weight"].dtype == weight_dtype
    stats = "SCB" if config.quant_type == "int8" else "weight_absmax"
    assert f"backbone.layers.0.mixer.in_proj.{stats}" in stored
    loaded = load_quantized(tmp_path)
    for fqn, module in model.named_modules():
        if isinstance(module, expected_type):
            other = loaded.get_submodule(fqn)
            assert isinstance(other, expected_type), fqn
            assert other.weight.dtype == weight_dtype and torch.equal(other.weight.data, module.weight.data), fqn
    assert type(loaded.backbone.layers[0].mixer.dt_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, before)
    # A second save of the loaded model writes the same tensors (what was loaded is what was saved).
    loaded.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() == stored.keys() and all(torch.equal(again[k], stored[k]) for k in stored)


def test_qlora_trains_adapters_only_then_merges_and_saves(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    peft_model = prepare_qlora(model, r=4, lora_alpha=8)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 10  # lora_A and lora_B on the 10 default layers
    base = peft_model.base_model.model.backbone.layers[0].mixer.in_proj.base_layer
    assert isinstance(base, bnb.nn.Linear4bit)
    frozen = base.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2
    assert torch.equal(base.weight.detach(), frozen)  # the 4-bit base did not move

    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 200_000
    with torch.no_grad():
        tuned = peft_model(input_ids=ids, labels=ids, use_cache=False).loss.item()
        merged = merge_qlora(peft_model)
        assert isinstance(merged.backbone.layers[0].mixer.in_proj, bnb.nn.Linear4bit)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        # Merging re-quantizes W + BA to NF4, which costs some of the gain, not most of it.
        merged_loss = merged(ids, labels=ids, use_cache=False).loss.item()
    assert merged_loss < (losses[0] + tuned) / 2, (losses[0], tuned, merged_loss)


def test_missing_optional_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an environment without it imports
    with pytest.raises(QuantizationError, match=r"bnb-nf4: needs the optional package bitsandbytes .*pip install "
                                                r"bitsandbytes==0\.50\.2"):
        quantize_(tiny_model(), BnbConfig())
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(QuantizationError, match=r"qlora: needs the optional package peft .*pip install peft=="):
        prepare_qlora(tiny_model())


def test_checkpoint_without_the_bnb_layouts_is_refused(tmp_path):
    # What moai_lib wrote for bitsandbytes models before their layers were stored: the method is recorded, the
    # layers' layouts are not. Loading must not fall back to a float model with missing (re-initialised) weights.
    import json

    model = tiny_model()
    quantize_(model, BnbConfig(quant_type="nf4"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["modules"] = {}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match=r"checkpoint: bnb quantized backbone\.layers\.0\.mixer\.in_proj, "
                                                "but the checkpoint records no stored layout.*re-quantize"):
        load_quantized(tmp_path)
