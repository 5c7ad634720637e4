"""The `moai` command line, run in-process through `main` and once as the installed console script."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moai_lib import cli
from moai_lib.config import preset_names


def moai_executable() -> str:
    found = shutil.which("moai") or str(Path(sys.executable).with_name("moai"))
    assert Path(found).is_file(), "the `moai` console script is not installed (pip install -e .)"
    return found


@pytest.fixture(scope="module")
def tokenizer(sample_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sample_tokenizer_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def generate_args(model_dir, tokenizer_dir, *extra) -> list[str]:
    return ["generate", "--model_path", str(model_dir), "--tokenizer_path", str(tokenizer_dir),
            "--max_new_tokens", "6", *extra]


# model-info ----------------------------------------------------------------------------------------------------
def test_model_info_preset_counts_and_memory(capsys):
    assert cli.main(["model-info", "--config", "16b"]) == 0
    out = capsys.readouterr().out
    assert "16,374,830,080" in out and "memory bf16" in out and "memory int4" in out and "assumption" in out


def test_model_info_verbose_has_one_row_per_layer(capsys):
    assert cli.main(["model-info", "--config", "8b", "--verbose"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines()[out.splitlines().index("per layer:") + 2:] if line.strip()]
    assert [int(r.split()[0]) for r in rows[:40]] == list(range(40))


def test_model_info_json_config_and_model_dir(capsys, tiny_model_dir):
    config_file = Path(__file__).resolve().parents[1] / "configs" / "mamba_config_2b.json"
    assert cli.main(["model-info", "--config", str(config_file)]) == 0
    assert "2,064,910,336" in capsys.readouterr().out
    assert cli.main(["model-info", "--config", str(tiny_model_dir)]) == 0
    assert "tied" in capsys.readouterr().out


def test_model_info_all_sizes(capsys):
    assert cli.main(["model-info", "--all-sizes"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()[1:] if line.split() and line.split()[0] in preset_names()]
    assert names == preset_names()


@pytest.mark.parametrize("config, needle", [("17b", "preset"), ("{bad", "not valid JSON")])
def test_model_info_bad_config(capsys, tmp_path, config, needle):
    if config.startswith("{"):
        (tmp_path / "bad.json").write_text(config)
        config = str(tmp_path / "bad.json")
    assert cli.main(["model-info", "--config", config]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_console_script_runs(tmp_path):
    """The installed `moai` entry point, in real processes: a success and a usage error (exit 2, no traceback)."""
    ok = subprocess.Popen([moai_executable(), "model-info", "--all-sizes"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    bad = subprocess.run([moai_executable(), "model-info", "--config", "nope"], capture_output=True, text=True)
    out, err = ok.communicate(timeout=120)
    assert ok.returncode == 0, err
    assert "16b" in out and "int4" in out
    assert bad.returncode == 2
    assert "nope" in bad.stderr and "Traceback" not in bad.stderr


# generate ----------------------------------------------------------------------------------------------------
def test_generate_prompt_streams_completion(capsys, tiny_model_dir, sample_tokenizer_dir, model, tokenizer):
    from moai_lib.model.generate import generate_text

    assert cli.main(generate_args(tiny_model_dir, sample_tokenizer_dir, "--prompt", "The weather", "--greedy")) == 0
    out = capsys.readouterr().out
    expected = generate_text(model, tokenizer, "The weather", max_new_tokens=6)[0]
    assert expected.strip() and out.strip() == expected.strip()


def test_generate_input_file_matches_direct_generate(tmp_path, tiny_model_dir, sample_tokenizer_dir, model,
                                                     tokenizer):
    prompts = ["Hello", "The quick brown fox jumps over", "Mamba is a state space model", "a"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[:2]) + "\n\n" + "\n".join(prompts[2:]) + "\n")
    out_file = tmp_path / "out.json"
    args = generate_args(tiny_model_dir, sample_tokenizer_dir, "--input_file", str(tmp_path / "prompts.txt"),
                         "--output_file", str(out_file), "--greedy", "--batch_size", "3")
    assert cli.main(args) == 0
    results = json.loads(out_file.read_text())
    assert [r["prompt"] for r in results] == prompts
    for result in results:  # batched with left padding == each prompt alone, unpadded
        ids = tokenizer(result["prompt"], return_tensors="pt")
        output = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
        new = output[0, ids.input_ids.shape[1]:]
        assert result["completion"] == tokenizer.decode(new, skip_special_tokens=True)
        assert result["num_new_tokens"] == len(new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "prompts.txt"]  # no temp file left behind


def test_generate_jsonl_input_with_sampling(tmp_path, tiny_model_dir, sample_tokenizer_dir):
    lines = [{"prompt": "Once upon a time"}, {"text": "データ"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    out_file = tmp_path / "out.json"
    args = generate_args(tiny_model_dir, sample_tokenizer_dir, "--input_file", str(tmp_path / "in.jsonl"),
                         "--output_file", str(out_file), "--do_sample", "--seed", "1", "--temperature", "0.8",
                         "--top_p", "0.9", "--top_k", "20")
    assert cli.main(args) == 0
    first = json.loads(out_file.read_text())
    assert [r["prompt"] for r in first] == ["Once upon a time", "データ"]
    assert all(0 < r["num_new_tokens"] <= 6 for r in first)
    assert cli.main(args) == 0
    assert json.loads(out_file.read_text()) == first  # same seed, same samples


def test_generate_chat(monkeypatch, capsys, tiny_model_dir, sample_tokenizer_dir):
    prompts = []
    real = cli.generate_text

    def spy(model, tokenizer, batch, **kwargs):
        prompts.append(batch[0])
        return real(model, tokenizer, batch, **kwargs)

    monkeypatch.setattr(cli, "generate_text", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nhow are you\n/reset\nagain\n/exit\nnever read\n"))
    assert cli.main(generate_args(tiny_model_dir, sample_tokenizer_dir, "--chat", "--greedy")) == 0
    out = capsys.readouterr().out
    assert len(prompts) == 3  # /exit stops before "never read"
    assert prompts[0] == "User: hello there\nAssistant:"
    assert prompts[1].startswith("User: hello there\nAssistant:") and prompts[1].endswith(
        "User: how are you\nAssistant:")  # the conversation is kept
    assert prompts[2] == "User: again\nAssistant:"  # /reset forgot it
    assert out.count("assistant>") == 3 and "(conversation reset)" in out


def test_generate_chat_ends_at_eof(monkeypatch, tiny_model_dir, sample_tokenizer_dir):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert cli.main(generate_args(tiny_model_dir, sample_tokenizer_dir, "--chat")) == 0


@pytest.fixture(scope="module")
def small_vocab_model_dir(tmp_path_factory):
    """A model whose vocabulary (300) is smaller than the sample tokenizer's (512)."""
    from moai_lib import MoaiMambaForCausalLM, get_mamba_config

    path = tmp_path_factory.mktemp("small_vocab_model")
    MoaiMambaForCausalLM(get_mamba_config("tiny", vocab_size=300)).save_pretrained(path)
    return path


BAD_INPUTS = {
    # case: (extra arguments, words the message must contain)
    "missing model dir": (["--model_path", "{tmp}/no_model", "--prompt", "hi"], ["model directory", "no_model"]),
    "missing tokenizer dir": (["--tokenizer_path", "{tmp}/no_tok", "--prompt", "hi"], ["tokenizer", "no_tok"]),
    "tokenizer larger than model": (["--model_path", "{small_vocab}", "--prompt", "hi"], ["512", "300", "resize"]),
    "no weights": (["--model_path", "{tmp}/config_only", "--prompt", "hi"], ["safetensors"]),
    "bad model config": (["--model_path", "{tmp}/bad_config", "--prompt", "hi"], ["not valid JSON"]),
    "empty prompt": (["--prompt", "  "], ["empty prompt"]),
    "temperature 0 with sampling": (["--prompt", "hi", "--temperature", "0"], ["temperature", "--greedy"]),
    "top_p 0": (["--prompt", "hi", "--top_p", "0"], ["top_p", "(0, 1]"]),
    "top_p above 1": (["--prompt", "hi", "--top_p", "1.5"], ["top_p", "1.5"]),
    "input file missing": (["--input_file", "{tmp}/nothing.txt"], ["input file", "does not exist"]),
    "input file empty": (["--input_file", "{tmp}/empty.txt"], ["input file", "empty"]),
    "jsonl without prompt": (["--input_file", "{tmp}/bad.jsonl"], ["bad.jsonl:1", "prompt"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_generate_bad_input_exits_2_before_loading(case, monkeypatch, capsys, tmp_path, tiny_model_dir,
                                                   sample_tokenizer_dir, small_vocab_model_dir):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    (tmp_path / "config_only").mkdir()
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config_only")
    (tmp_path / "bad_config").mkdir()
    shutil.copy(tiny_model_dir / "model.safetensors", tmp_path / "bad_config")
    (tmp_path / "bad_config" / "config.json").write_text("{not json")

    def no_model_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(cli, "_load_model", no_model_loading)
    extra, needles = BAD_INPUTS[case]
    extra = [a.format(tmp=tmp_path, small_vocab=small_vocab_model_dir) for a in extra]
    args = ["generate", "--model_path", str(tiny_model_dir), "--tokenizer_path", str(sample_tokenizer_dir)]
    for flag in ("--model_path", "--tokenizer_path"):  # a flag given in `extra` replaces the default
        if flag in extra:
            i = args.index(flag)
            del args[i:i + 2]
    out_file = tmp_path / "out.json"
    if "--input_file" in extra:
        extra += ["--output_file", str(out_file)]
    assert cli.main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moai generate: error:") and "Traceback" not in err
    for needle in needles:
        assert needle in err
    assert not out_file.exists()


def test_generate_requires_output_file_with_input_file(capsys, tmp_path, tiny_model_dir, sample_tokenizer_dir):
    (tmp_path / "p.txt").write_text("hi\n")
    assert cli.main(generate_args(tiny_model_dir, sample_tokenizer_dir, "--input_file", str(tmp_path / "p.txt"))) == 2
    assert "--output_file" in capsys.readouterr().err


def test_generate_needs_one_mode(capsys, tiny_model_dir, sample_tokenizer_dir):
    with pytest.raises(SystemExit) as exc:  # argparse: exactly one of --prompt / --chat / --input_file
        cli.main(generate_args(tiny_model_dir, sample_tokenizer_dir))
    assert exc.value.code == 2


def test_generate_text_library_pads_left_and_falls_back_to_eos(model, tokenizer):
    from moai_lib.model.generate import generate_completions

    class NoPad:  # the tokenizer without a pad token: eos pads
        def __init__(self, inner):
            self.inner = inner
            self.pad_token_id = None
            self.eos_token_id = inner.eos_token_id

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

        def decode(self, *args, **kwargs):
            return self.inner.decode(*args, **kwargs)

    prompts = ["short", "a much longer prompt than the other one"]
    with_pad = generate_completions(model, tokenizer, prompts, max_new_tokens=5)
    eos_pad = generate_completions(model, NoPad(tokenizer), prompts, max_new_tokens=5)
    one_by_one = [generate_completions(model, tokenizer, p, max_new_tokens=5)[0] for p in prompts]
    assert with_pad == eos_pad == one_by_one
    with pytest.raises(ValueError, match="empty"):
        generate_completions(model, tokenizer, ["ok", ""])
    with pytest.raises(ValueError, match="top_p"):
        generate_completions(model, tokenizer, "ok", top_p=0.0)
