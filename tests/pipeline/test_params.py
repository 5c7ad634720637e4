"""PipelineParams: one parser of params.yaml; bad inputs fail before any work with a message naming the param,
and leave existing outputs untouched."""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import REPO, make_root, tiny_params, tree_state, write_params

from moai_lib.cli import main
from moai_lib.data import make_random_shards
from moai_lib.pipeline import PipelineError, PipelineParams
from moai_lib.pipeline.params import apply_overrides


@pytest.fixture
def root(tmp_path):
    return make_root(tmp_path)


def load(root, *overrides):
    return PipelineParams.load(root / "params.yaml", overrides=overrides)


def test_profiles_parse():
    """Every profile in params/ and params.yaml is a valid params file (paths resolved as if it were the
    root's params.yaml; a corpus outside the repo is replaced by the sample when absent)."""
    import yaml

    assert (REPO / "params.yaml").read_text() == (REPO / "params" / "cpu-sample.yaml").read_text()
    params = PipelineParams.load(REPO / "params.yaml")
    assert params.variants() == ["bf16", "qat", "int4", "int8", "gptq", "awq", "fp8"]
    for name in ("tiny", "2b", "8b", "16b", "h200"):
        data = yaml.safe_load((REPO / "params" / f"{name}.yaml").read_text())
        if not (REPO / data["tokenize"]["corpus"]).exists():  # a corpus outside the repo, absent here
            data["tokenize"]["corpus"] = "data/sample/train.jsonl"
            data["tokenize"]["valid_corpus"] = "data/sample/valid.jsonl"
        p = PipelineParams.from_dict(data, root=REPO)
        assert p.quantize.methods and p.variants()[:2] == ["bf16", "qat"]


def test_load_and_views(root):
    params = load(root)
    assert params.root == root.resolve()
    assert params.variants() == ["bf16", "qat", "int4", "gptq"]
    assert params.path("model", variant="bf16") == root / "outputs/models/pretrain"
    assert params.path("model", variant="gptq") == root / "outputs/models/quantized/gptq"
    assert params.path("metrics", name="quantize_gptq") == root / "metrics/quantize_gptq.json"
    assert params.quantize.config("gptq").step == "prepare"
    assert params.quantize.method_type("int4") == "rtn"
    # qat.train on top of pretrain's training settings
    assert params.qat_train.learning_rate == 5e-4 and params.qat_train.batch_size == params.pretrain.batch_size
    assert params.section("pretrain")["max_steps"] == 8
    assert type(params.evaluate).__name__ == "EvaluateParams"
    assert type(params.tracking).__name__ == "TrackingParams"


def test_overrides_are_yaml_typed(root):
    params = load(root, "pretrain.learning_rate=1e-3", "quantize.methods.int4.layers=[in_proj, out_proj]",
                  "pretrain.resume=false", "quantize.methods.new8={method: rtn, bits: 8, group_size: -1}",
                  "quantize.methods.nf4={method: bnb, quant_type: nf4, compute_dtype: bfloat16}")
    assert params.pretrain.learning_rate == 1e-3 and params.pretrain.resume is False
    import torch

    from moai_lib.quant import BnbConfig

    assert params.quantize.config("nf4") == BnbConfig(quant_type="nf4", compute_dtype=torch.bfloat16)
    assert params.quantize.layers("int4") == ["in_proj", "out_proj"]
    assert params.quantize.config("new8").bits == 8 and "new8" in params.variants()
    assert apply_overrides({"a": {"b": 1}}, ["a.c.d=x"]) == {"a": {"b": 1, "c": {"d": "x"}}}
    with pytest.raises(PipelineError, match="KEY=VALUE"):
        load(root, "pretrain.learning_rate")
    with pytest.raises(PipelineError, match="pretrain.max_steps is a int, not a section"):
        load(root, "pretrain.max_steps.x=1")


# Bad inputs: (override or edit, the param the message must name, a phrase of the fix) -----------------------
BAD = [
    ("empty-corpus-list", ["tokenize.corpus=[]"], "tokenize.corpus", "expected a file"),
    ("missing-corpus-file", ["tokenize.corpus=data/nope.jsonl"], "tokenize.corpus", "does not exist"),
    ("corpus-glob-no-match", ["tokenize.corpus=data/*.parquet"], "tokenize.corpus", "matches no files"),
    ("unknown-method", ["quantize.methods.magic={method: magic4}"], "quantize.methods.magic.method",
     "valid methods: rtn, gptq, awq, fp8, fp4, bnb"),
    ("unknown-method-by-name", ["quantize.methods.hqq={}"], "quantize.methods.hqq", "valid methods"),
    ("unknown-method-setting", ["quantize.methods.gptq.groupsize=32"], "quantize.methods.gptq.groupsize",
     "valid: method, layers, bits, group_size"),
    ("negative-lr", ["pretrain.learning_rate=-1e-3"], "pretrain.learning_rate", "> 0"),
    ("negative-qat-lr", ["qat.train.learning_rate=-1"], "qat.train.learning_rate", "> 0"),
    ("group-size-not-dividing", ["quantize.methods.int4.group_size=64"], "quantize.methods.int4.group_size",
     "input width 32, not divisible by group_size=64"),
    ("qat-group-size-not-dividing", ["qat.group_size=128"], "qat.group_size", "use group_size=32"),
    ("unsupported-group-size", ["quantize.methods.gptq.group_size=48"], "quantize.methods.gptq.group_size",
     "use one of 32, 64, 128, -1"),
    ("awq-bits", ["quantize.methods.awq={bits: 8}"], "quantize.methods.awq.bits", "use bits in (4,)"),
    ("bnb-quant-type", ["quantize.methods.q={method: bnb, quant_type: int4}"], "quantize.methods.q.quant_type",
     "choose one of nf4, fp4, int8"),
    ("bnb-compute-dtype", ["quantize.methods.q={method: bnb, compute_dtype: fp8}"], "quantize.methods.q.compute_dtype",
     "valid: float32, bfloat16, float16"),
    ("layers-select-nothing", ["quantize.methods.int4.layers=[conv1d]"], "quantize.methods.int4.layers",
     "selects no linear layer"),
    ("path-escape", ["paths.models=../elsewhere"], "paths.models", "outside the run directory"),
    ("absolute-path-escape", ["paths.reports=/tmp/moai-reports"], "paths.reports", "outside the run directory"),
    ("unknown-section", ["pretrian.max_steps=3"], "pretrian", "valid sections: tokenize, model"),
    ("unknown-train-key", ["pretrain.lr=0.1"], "pretrain.lr", "unknown training parameter"),
    ("unknown-evaluate-key", ["evaluate.bogus=1"], "evaluate.bogus", ""),
    ("max-length-too-long", ["pretrain.max_length=4096", "tokenize.block_size=4096"], "pretrain.max_length",
     "max_position_embeddings"),
    ("max-length-not-dividing", ["pretrain.max_length=48"], "pretrain.max_length", "divide"),
    ("bad-model-preset", ["model.preset=huge"], "model.preset", "tiny"),
    ("bad-model-override", ["model.overrides.hidden_size=-4"], "model.overrides.hidden_size", "> 0"),
    ("misspelt-model-field", ["model.overrides.hiden_size=64"], "model.overrides.hiden_size", "hidden_size"),
    ("tracking-bad-key", ["tracking.url=http://x"], "tracking.url", "valid keys"),
]


@pytest.mark.parametrize("overrides,param,fix", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_params_name_the_param(root, overrides, param, fix):
    with pytest.raises(PipelineError) as info:
        load(root, *overrides)
    message = str(info.value)
    assert message.startswith(param), message
    assert fix in message, message


def test_empty_corpus_file(root):
    (root / "data" / "sample" / "valid.jsonl").write_text("")
    with pytest.raises(PipelineError, match=r"^tokenize\.valid_corpus: .*is empty"):
        load(root)


def test_missing_corpus_key_and_file(root, tmp_path):
    data = tiny_params()
    del data["tokenize"]["corpus"]
    write_params(root, data)
    with pytest.raises(PipelineError, match=r"^tokenize\.corpus: missing"):
        load(root)
    with pytest.raises(PipelineError, match="does not exist"):
        PipelineParams.load(tmp_path / "nope.yaml")


def _outputs(root):
    """Existing outputs of an earlier run (must survive a failed command untouched)."""
    for rel in ("outputs/models/pretrain/model.safetensors", "metrics/pretrain.json", "reports/comparison.md"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps({"old": rel}))
    return {k: tree_state(root / k) for k in ("outputs", "metrics", "reports")}


@pytest.mark.parametrize("overrides,param,fix", [b[1:] for b in BAD[:12]], ids=[b[0] for b in BAD[:12]])
def test_cli_fails_before_work_and_leaves_outputs(root, capsys, overrides, param, fix):
    before = _outputs(root)
    args = ["stage", "pretrain", "--params", str(root / "params.yaml")]
    for item in overrides:
        args += ["-S", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moai stage: error: {param}") and "Traceback" not in err, err
    assert {k: tree_state(root / k) for k in ("outputs", "metrics", "reports")} == before


def test_batch_larger_than_data_fails_before_training(root, capsys):
    """Checked after tokenize (against the shards), before the model is built."""
    params = load(root)
    make_random_shards(root / "outputs" / "data", vocab_size=params.tokenize.vocab_size, block_size=64,
                       train_blocks=10, valid_blocks=2)
    before = _outputs(root)
    with pytest.raises(PipelineError, match=r"^pretrain\.batch_size: .* only 10 sequences"):
        load(root, "pretrain.batch_size=16").check_data()
    with pytest.raises(PipelineError, match=r"^qat\.train\.batch_size: "):
        load(root, "qat.train.gradient_accumulation_steps=4").check_data()
    args = ["stage", "pretrain", "--params", str(root / "params.yaml"), "-S", "pretrain.batch_size=11"]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("moai stage: error: pretrain.batch_size:")
    assert {k: tree_state(root / k) for k in ("outputs", "metrics", "reports")} == before
    assert not (root / "outputs" / "checkpoints").exists()


def test_stage_arguments(root, capsys):
    params = load(root)
    from moai_lib.pipeline.stages import run_stage

    with pytest.raises(PipelineError, match="quantize.methods: no method named 'awq'; valid: int4, gptq"):
        run_stage("quantize", params, method="awq")
    with pytest.raises(PipelineError, match="unknown variant 'fp8'"):
        run_stage("evaluate", params, variant="fp8")
    with pytest.raises(PipelineError, match="stage 'deploy' does not exist"):
        run_stage("deploy", params)
    assert main(["stage", "quantize", "--params", str(root / "params.yaml")]) == 2
    assert "quantize runs one method" in capsys.readouterr().err


@pytest.mark.parametrize("content,problem", [(b"\xff\xfe\x00bad bytes\n", "UTF-8"), (b"{not json\n", "JSON"),
                                             (b'{"title": "no text field"}\n', "text")],
                         ids=["undecodable", "not-json", "no-text-field"])
def test_bad_corpus_fails_in_tokenize_naming_the_param(root, content, problem):
    """Problems only reading can find: the tokenize stage names the param; earlier shards stay."""
    from moai_lib.pipeline.stages import run_stage

    params = load(root)
    make_random_shards(root / "outputs" / "data", vocab_size=320, block_size=64, train_blocks=4, valid_blocks=2)
    before = tree_state(root / "outputs")
    (root / "data" / "sample" / "valid.jsonl").write_bytes(content)
    with pytest.raises(PipelineError) as info:
        run_stage("tokenize", params)
    assert str(info.value).startswith("tokenize.valid_corpus: ") and problem in str(info.value), str(info.value)
    assert tree_state(root / "outputs") == before
    assert not (root / "metrics" / "tokenize.json").exists()
