"""export_model on real tiny variants: HF directory contents, reload with identical logits and quantized
layers (after `import moai_lib`, and with trust_remote_code in a fresh process that never imports it first),
model card, atomicity, bad params."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from eval_helpers import SAMPLE_DIR, calibration, quantized, save_variant, tiny_model, write_data_dir

from moai_lib.data import PackedDataset
from moai_lib.pipeline.errors import PipelineError
from moai_lib.pipeline.export import AUTO_MAP, ExportParams, export_model
from moai_lib.quant import quantized_modules

PARAMS = ExportParams(sources=str(SAMPLE_DIR / "SOURCES.md"))
METRICS = {"variant": "x", "method": "rtn", "device": "cpu", "ppl": 123.456, "ppl_en": 150.0, "ppl_zh": 99.0,
           "bits_per_weight": 4.3125, "size_mb": 0.55, "decode_tok_s": 321.0}
VARIANTS = ("bf16", "rtn4", "gptq", "fp8")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sample_tokenizer_dir, probe):
    """{variant: (export dir, the in-memory model it came from, its logits on `probe`)}."""
    root = tmp_path_factory.mktemp("export")
    data_dir = write_data_dir(sample_tokenizer_dir, root / "data")
    base = tiny_model(PackedDataset(data_dir, "valid").vocab_size)
    calib = calibration(data_dir)
    out = {}
    for name in VARIANTS:
        model = base if name == "bf16" else quantized(base, name, calib)
        # The bf16 variant ships the tokenizer saved with the model; the others get it from tokenizer_dir.
        variant_dir = save_variant(model, root / "variants" / name, sample_tokenizer_dir if name == "bf16" else None)
        path = export_model(variant_dir, root / "exports" / name, variant=name, metrics={**METRICS, "variant": name},
                            params=PARAMS, tokenizer_dir=None if name == "bf16" else data_dir / "tokenizer")
        with torch.no_grad():
            logits = model(probe, use_cache=False).logits
        out[name] = (path, model, logits)
    return out


def test_export_directory_contents(exported):
    for name, (path, _, _) in exported.items():
        files = {p.name for p in path.iterdir()}
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "README.md", "DATA_SOURCES.md", "configuration_moai.py", "modeling_moai.py"} <= files, files
        config = json.loads((path / "config.json").read_text())
        assert config["auto_map"] == AUTO_MAP and config["model_type"] == "moai_mamba"
        assert ("quantization_config" in config) == (name != "bf16")
        gen = json.loads((path / "generation_config.json").read_text())
        assert (gen["eos_token_id"], gen["pad_token_id"]) == (0, 1)  # <|endoftext|>, <|pad|>
        assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_model_card(exported):
    card = (exported["rtn4"][0] / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n")
    for needle in ("language:\n- en\n- zh", "quantized-rtn", "| ppl | 123.5 |", "| bits_per_weight | 4.312 |",
                   "## Intended use", "## Training data", "`kolaw` | ko", "## Quantization",
                   "`rtn` on 10 layers: bits=4, group_size=128", "trust_remote_code=True", "pip install moai"):
        assert needle in card, needle
    plain = (exported["bf16"][0] / "README.md").read_text()
    assert "quantized-" not in plain and "None: weights stored as float32" in plain


def test_reload_after_import_gives_identical_logits_and_layers(exported, probe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, (path, model, logits) in exported.items():
        loaded = AutoModelForCausalLM.from_pretrained(path).eval()
        expected = {fqn: type(m) for fqn, m in quantized_modules(model).items()}
        assert {fqn: type(m) for fqn, m in quantized_modules(loaded).items()} == expected
        assert len(expected) == (0 if name == "bf16" else 10)
        with torch.no_grad():
            assert torch.equal(loaded(probe, use_cache=False).logits, logits), name
        assert AutoTokenizer.from_pretrained(path).eos_token_id == 0


REMOTE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    assert "moai_lib" not in sys.modules
    out = {}
    for path in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        # The first load runs the export's remote code, which imports moai_lib and so registers the model
        # type: later loads in this process then take the registered (local) classes, as transformers does.
        if path == sys.argv[2]:
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            logits = model(torch.load(sys.argv[1]), use_cache=False).logits
        layer = model.backbone.layers[0].mixer.in_proj
        out[path] = {"layer": type(layer).__module__ + "." + type(layer).__name__, "logits": logits.tolist()}
    print("RESULT" + json.dumps(out))
""")


def test_trust_remote_code_without_importing_moai_lib(exported, probe, tmp_path):
    """In one fresh process (interpreter start-up is the slow part): first the quantized rtn4 export, through
    its remote code, then the others."""
    torch.save(probe, tmp_path / "probe.pt")
    order = ("rtn4", "bf16", "gptq", "fp8")
    paths = [str(exported[name][0]) for name in order]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "OMP_NUM_THREADS": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "probe.pt"), *paths],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    layers = {"bf16": "torch.nn.modules.linear.Linear", "rtn4": "moai_lib.quant.linear.QuantizedLinear",
              "gptq": "moai_lib.quant.linear.QuantizedLinear", "fp8": "moai_lib.quant.fp8.Float8Linear"}
    for name, path in zip(order, paths, strict=True):
        assert result[path]["layer"] == layers[name]
        assert torch.equal(torch.tensor(result[path]["logits"]), exported[name][2]), name


def test_failed_export_leaves_nothing(exported, tmp_path):
    variant_dir = exported["rtn4"][0]  # an export is a valid variant directory too
    target = tmp_path / "out"
    with pytest.raises(PipelineError, match="export.sources"):
        export_model(variant_dir, target, variant="rtn4", metrics=METRICS, params=ExportParams(sources="missing.md"),
                     root=tmp_path)
    assert list(tmp_path.iterdir()) == []
    # An existing export survives a failed re-export.
    export_model(variant_dir, target, variant="rtn4", metrics=METRICS, params=PARAMS)
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(PipelineError, match="no tokenizer"):
        export_model(variant_dir.parent.parent / "variants" / "rtn4", target, variant="rtn4", metrics=METRICS,
                     params=PARAMS)  # a variant saved without a tokenizer, and no tokenizer_dir
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_old_format_bitsandbytes_variant_is_refused(tmp_path, sample_tokenizer_dir):
    """A float model plus quantize_on_load.json (what bitsandbytes variants were) is not exported as the float
    model it holds: the error says to re-run its quantize stage."""
    variant = save_variant(tiny_model(512), tmp_path / "nf4", sample_tokenizer_dir)
    (variant / "quantize_on_load.json").write_text(json.dumps({"method": "bnb", "quant_type": "nf4"}))
    with pytest.raises(PipelineError, match=r"bitsandbytes variant in the old format .* re-run its quantize stage "
                                            r"\(`moai stage quantize --method nf4`"):
        export_model(variant, tmp_path / "out", variant="nf4", metrics=METRICS, params=PARAMS)
    assert not (tmp_path / "out").exists()


def test_params_reject_unknown_and_bad_values():
    with pytest.raises(PipelineError, match=r"export\.bogus"):
        ExportParams.from_dict({"bogus": 1})
    with pytest.raises(PipelineError, match=r"export\.model_name"):
        ExportParams(model_name="a b/c")
    with pytest.raises(PipelineError, match=r"export\.verify"):
        ExportParams.from_dict({"verify": "yes"})
    assert ExportParams.from_dict({"license": "mit"}).license == "mit"


def test_compressed_tensors_format(exported, tmp_path):
    """export.format: compressed-tensors writes quantized variants in that format (decoded here by the
    compressed-tensors package itself) and the float variant as a plain dense checkpoint."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    params = ExportParams(sources=str(SAMPLE_DIR / "SOURCES.md"), format="compressed-tensors")
    for name, fmt in (("rtn4", "pack-quantized"), ("fp8", "float-quantized")):
        variant_dir, model, _ = exported[name]  # an hf export is a valid variant directory
        path = export_model(variant_dir, tmp_path / name, variant=name, metrics=METRICS, params=params)
        config = json.loads((path / "config.json").read_text())
        qc = QuantizationConfig.model_validate(config["quantization_config"])
        assert qc.quant_method == "compressed-tensors" and qc.format == fmt
        assert config["auto_map"] == AUTO_MAP and (path / "tokenizer.json").is_file()
        assert "compressed-tensors" in (path / "README.md").read_text()
        tensors = load_file(path / "model.safetensors")
        (scheme,) = qc.config_groups.values()
        for fqn, layer in quantized_modules(model).items():
            local = {k[len(fqn) + 1:]: v for k, v in tensors.items() if k.startswith(fqn + ".")}
            weight = BaseCompressor.get_value_from_registry(scheme.format).decompress(local, scheme)["weight"]
            assert torch.equal(weight, layer.weight), (name, fqn)
    path = export_model(exported["bf16"][0], tmp_path / "bf16", variant="bf16", metrics=METRICS, params=params)
    assert "quantization_config" not in json.loads((path / "config.json").read_text())


def test_compressed_tensors_format_refuses_what_it_cannot_express():
    from moai_lib.pipeline.params import QuantizeParams

    with pytest.raises(PipelineError, match=r"export\.format must be one of 'hf', 'compressed-tensors', got 'gguf'"):
        ExportParams.from_dict({"format": "gguf"})
    params = ExportParams(format="compressed-tensors")
    ok = QuantizeParams(methods={"int4": {"method": "rtn"}, "fp8": {}, "gptq": {"act_order": True,
                                                                               "static_groups": True},
                                 "awq": {"layers": ["in_proj", "fc1"]}})
    params.check_quantize(ok)
    ExportParams().check_quantize(QuantizeParams(methods={"awq": {}, "fp4": {}, "nf4": {"method": "bnb"}}))  # hf: all
    for methods, match in (
        ({"awq": {}}, r"variant 'awq' \(awq\): AWQ's scales .* set quantize\.methods\.awq\.layers: \[in_proj, fc1\]"),
        ({"g": {"method": "gptq", "act_order": True}}, r"variant 'g' \(gptq\).*static_groups: true"),
        ({"fp4": {"format": "mxfp4"}}, r"variant 'fp4' \(fp4\): FP4 .*drop the variant, or use export\.format: hf"),
        ({"nf4": {"method": "bnb"}}, r"variant 'nf4' \(bnb\): bitsandbytes .*drop the variant, or use export"),
    ):
        with pytest.raises(PipelineError, match=r"export\.format: 'compressed-tensors' cannot express " + match):
            params.check_quantize(QuantizeParams(methods=methods))


def test_compressed_tensors_format_is_checked_when_params_load():
    from moai_lib.pipeline import PipelineParams

    repo = SAMPLE_DIR.parent.parent
    with pytest.raises(PipelineError, match=r"export\.format: 'compressed-tensors' cannot express variant 'awq'"):
        PipelineParams.load(repo / "params.yaml", overrides=["export.format=compressed-tensors"])
    params = PipelineParams.load(repo / "params.yaml", overrides=[
        "export.format=compressed-tensors", "quantize.methods.awq.layers=[in_proj, fc1]"])
    assert params.export.format == "compressed-tensors"
