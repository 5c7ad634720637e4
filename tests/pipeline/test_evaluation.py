"""evaluate_variant on real tiny variants (plain, RTN INT4/INT8, QAT, GPTQ, AWQ, FP8, bitsandbytes), and the
comparison report built from its results."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import calibration, quantized, save_variant, tiny_model, write_data_dir

from moai_lib.data import PackedDataset
from moai_lib.pipeline.errors import PipelineError
from moai_lib.pipeline.evaluation import EvaluateParams, evaluate_variant
from moai_lib.pipeline.report import comparison_rows, markdown_table, write_report

FAST = EvaluateParams(max_batches=None, batch_size=32, prefill_len=16, decode_tokens=4, repeats=1, warmup=1,
                      device="cpu")
METHODS = ("rtn4", "rtn8", "qat", "gptq", "awq", "fp8")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, sample_tokenizer_dir) -> Path:
    return write_data_dir(sample_tokenizer_dir, tmp_path_factory.mktemp("eval") / "data")


@pytest.fixture(scope="module")
def variants(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Variant directories: bf16 (the float baseline, stored fp32) and one per method in METHODS."""
    root = tmp_path_factory.mktemp("variants")
    base = tiny_model(PackedDataset(data_dir, "valid").vocab_size)
    calib = calibration(data_dir)
    out = {"bf16": save_variant(base, root / "bf16")}
    for method in METHODS:
        out[method] = save_variant(quantized(base, method, calib), root / method)
    return out


@pytest.fixture(scope="module")
def results(variants, data_dir) -> dict[str, dict]:
    return {name: evaluate_variant(path, data_dir, FAST, variant=name) for name, path in variants.items()}


def test_params_reject_unknown_and_bad_values():
    with pytest.raises(PipelineError, match=r"evaluate\.bogus"):
        EvaluateParams.from_dict({"bogus": 1})
    with pytest.raises(PipelineError, match=r"evaluate\.batch_size"):
        EvaluateParams.from_dict({"batch_size": 0})
    with pytest.raises(PipelineError, match=r"evaluate\.device"):
        EvaluateParams(device="tpu")
    with pytest.raises(PipelineError, match=r"evaluate\.dtype"):
        EvaluateParams(dtype="int4")
    with pytest.raises(PipelineError, match=r"evaluate\.max_batches"):
        EvaluateParams(max_batches=True)
    assert EvaluateParams.from_dict({"repeats": 5, "device": "cpu"}).repeats == 5
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match=r"evaluate\.device.*cuda"):
            evaluate_variant("unused", "unused", EvaluateParams(device="cuda"), variant="x")


def test_perplexity_is_exp_of_mean_token_nll(variants, data_dir, results):
    """ppl and ppl_<lang> equal exp(mean NLL) computed here with F.cross_entropy over every valid sequence."""
    from transformers import AutoModelForCausalLM

    valid = PackedDataset(data_dir, "valid")
    for name in ("bf16", "rtn4"):
        model = AutoModelForCausalLM.from_pretrained(variants[name], dtype=torch.float32).eval()
        x = valid.batch(range(len(valid)))
        with torch.no_grad():
            logits = model(x, use_cache=False).logits[:, :-1, :model.config.vocab_size].float()
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").sum(1)  # per sequence
        sums, counts = {}, {}
        for i in range(len(valid)):
            lang = valid.languages[valid.langs[i]]
            sums[lang] = sums.get(lang, 0.0) + nll[i].item()
            counts[lang] = counts.get(lang, 0) + x.shape[1] - 1
        r = results[name]
        assert r["eval_tokens"] == sum(counts.values()) == len(valid) * 63
        assert r["nll"] == pytest.approx(sum(sums.values()) / sum(counts.values()), rel=1e-6)
        assert r["ppl"] == pytest.approx(math.exp(sum(sums.values()) / sum(counts.values())), rel=1e-6)
        assert sorted(lang for lang in sums) == ["en", "ja", "ko", "zh"]
        for lang in sums:
            assert r[f"ppl_{lang}"] == pytest.approx(math.exp(sums[lang] / counts[lang]), rel=1e-6)


def test_metrics_of_every_variant(variants, results):
    base = results["bf16"]
    for name, r in results.items():
        assert (r["variant"], r["device"]) == (name, "cpu")
        assert r["method"] == {"bf16": "none", "rtn4": "rtn", "rtn8": "rtn"}.get(name, name)
        numbers = {k: v for k, v in r.items() if k not in ("variant", "method", "device")}
        assert all(isinstance(v, int | float) and math.isfinite(v) for v in numbers.values()), numbers
        files = list(variants[name].glob("*.safetensors"))
        assert r["size_bytes"] == sum(f.stat().st_size for f in files)
        assert r["size_mb"] == pytest.approx(r["size_bytes"] / 1e6)
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_mem_mb"] >= 0
        assert r["params"] == base["params"]  # logical parameters: quantized layers count in·out
        assert r["quantized_layers"] == (0 if name == "bf16" else 10)  # 5 layers × 2 blocks
        if name != "bf16":
            assert r["size_bytes"] < base["size_bytes"]
            assert r["ppl"] == pytest.approx(base["ppl"], rel=0.05)  # same model, small quantization error
    # Bits per weight of the quantized layers, exactly: INT-b with group 128 stores b bits + one fp32 scale and
    # one uint8 zero point per 128 weights.
    assert base["bits_per_weight"] == 32.0 and base["model_bits_per_weight"] == 32.0
    for name in ("rtn4", "qat", "gptq"):
        assert results[name]["bits_per_weight"] == 4 + (32 + 8) / 128
    assert results["rtn8"]["bits_per_weight"] == 8 + (32 + 8) / 128
    # AWQ adds run-time input scales (fp32, one per input channel) on x_proj, out_proj and fc2.
    assert 4 + 40 / 128 < results["awq"]["bits_per_weight"] < 4.5
    assert 8 < results["fp8"]["bits_per_weight"] < 8.5  # + one fp32 scale per output row
    assert results["rtn4"]["model_bits_per_weight"] < results["rtn8"]["model_bits_per_weight"] < 32


def test_bits_per_weight_follow_the_stored_scale_dtype(tmp_path, data_dir):
    """A bf16 checkpoint stores bf16 scales: 4 + (16 + 8) / 128 bits, whatever dtype it is evaluated in."""
    from moai_lib.quant import IntWeightOnlyConfig, quantize_

    model = tiny_model(PackedDataset(data_dir, "valid").vocab_size).to(torch.bfloat16)
    save_variant(quantize_(model, IntWeightOnlyConfig(bits=4, group_size=128)), tmp_path / "int4_bf16")
    r = evaluate_variant(tmp_path / "int4_bf16", data_dir, FAST, variant="int4_bf16")
    assert r["bits_per_weight"] == 4 + (16 + 8) / 128


def test_bitsandbytes_variant_loads_quantized(tmp_path, data_dir, results):
    """A saved NF4 checkpoint is evaluated with its bitsandbytes layers; a variant in the old format (a float model
    plus quantize_on_load.json) is refused, not evaluated as the float model it holds."""
    bnb = pytest.importorskip("bitsandbytes")
    from moai_lib.pipeline.evaluation import load_variant
    from moai_lib.quant import BnbConfig, quantize_

    base = tiny_model(PackedDataset(data_dir, "valid").vocab_size)
    save_variant(quantize_(base, BnbConfig(quant_type="nf4")), tmp_path / "nf4")
    assert isinstance(load_variant(tmp_path / "nf4").backbone.layers[0].mixer.in_proj, bnb.nn.Linear4bit)
    r = evaluate_variant(tmp_path / "nf4", data_dir, FAST, variant="nf4")
    assert r["method"] == "bnb" and r["quantized_layers"] == 10
    assert 4 < r["bits_per_weight"] < 5  # 4-bit codes + absmax per 64-value block (+ a 16-entry code book)
    assert r["size_bytes"] < results["bf16"]["size_bytes"]
    assert r["ppl"] != results["bf16"]["ppl"] and r["ppl"] == pytest.approx(results["bf16"]["ppl"], rel=0.05)
    old = save_variant(tiny_model(PackedDataset(data_dir, "valid").vocab_size), tmp_path / "old")
    (old / "quantize_on_load.json").write_text(json.dumps({"method": "bnb", "quant_type": "nf4"}))
    with pytest.raises(PipelineError, match=r"old format .* re-run its quantize stage \(`moai stage quantize "
                                            r"--method old` or `dvc repro quantize@old`\)"):
        evaluate_variant(old, data_dir, FAST, variant="old")


def test_decode_speed_runs_the_recurrent_step(variants, monkeypatch):
    """Every timed and warm-up decode token goes through the O(1) recurrent step of every layer."""
    from moai_lib.model.mamba import MambaMixer
    from moai_lib.pipeline.evaluation import load_variant, measure_speed

    calls = []
    step = MambaMixer.step  # the mixer's one-token step (the decode path calls it through decode_step)
    monkeypatch.setattr(MambaMixer, "step", lambda self, u, cache: calls.append(u.shape) or step(self, u, cache))
    model = load_variant(variants["rtn4"])
    speed = measure_speed(model, FAST, torch.device("cpu"))
    runs = FAST.warmup + FAST.repeats
    assert len(calls) == runs * FAST.decode_tokens * model.config.num_hidden_layers
    assert set(calls) == {torch.Size([FAST.speed_batch_size, model.config.hidden_size])}
    assert speed["decode_tok_s"] == pytest.approx(1e3 / speed["decode_ms_per_token"])


def test_missing_model_dir_fails_clearly(tmp_path, data_dir):
    with pytest.raises(PipelineError, match=r"evaluate\.seq_len"):
        evaluate_variant(tmp_path / "nothing", data_dir, EvaluateParams(seq_len=48), variant="x")
    with pytest.raises(PipelineError, match="no index.json"):
        evaluate_variant(tmp_path / "nothing", tmp_path, FAST, variant="x")
    with pytest.raises(PipelineError, match="not a model directory"):
        evaluate_variant(tmp_path / "nothing", data_dir, FAST, variant="x")


# Report ----------------------------------------------------------------------------------------------------
def test_report_files_and_table(tmp_path, results):
    ordered = [results[name] for name in ("bf16", *METHODS)]
    paths = write_report(ordered, tmp_path / "reports")
    assert set(paths) == {"csv", "markdown", "plot_ppl_vs_size", "plot_speed"}
    assert paths["plot_ppl_vs_size"] == tmp_path / "reports" / "plots" / "ppl_vs_size.png"
    for key in ("plot_ppl_vs_size", "plot_speed"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[key].stat().st_size > 1000
    with open(paths["csv"], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [row["variant"] for row in rows] == ["bf16", *METHODS]
    for row, r in zip(rows, ordered, strict=True):
        assert float(row["ppl"]) == r["ppl"] and float(row["bits_per_weight"]) == r["bits_per_weight"]
        assert float(row["ppl_zh"]) == r["ppl_zh"]
        assert float(row["delta_ppl_pct"]) == pytest.approx(100 * (r["ppl"] / results["bf16"]["ppl"] - 1))
    assert float(rows[0]["delta_ppl_pct"]) == 0.0
    md = paths["markdown"].read_text(encoding="utf-8")
    table = markdown_table(ordered)
    assert table in md
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(ordered)
    assert "Δppl vs bf16 %" in lines[0] and "ppl ko" in lines[0] and "decode tok/s" in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert not [p for p in (tmp_path / "reports").rglob(".*tmp*")]  # no temporary files left behind


def test_report_without_baseline_and_bad_input(results):
    rows = comparison_rows([results["rtn4"], results["gptq"]])
    assert all(row["delta_ppl_pct"] is None for row in rows)
    with pytest.raises(PipelineError, match="more than once"):
        comparison_rows([results["rtn4"], results["rtn4"]])
    with pytest.raises(PipelineError, match="no evaluation results"):
        comparison_rows([])
