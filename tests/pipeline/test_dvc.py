"""dvc.yaml end to end with real DVC on the tiny profile, in a temporary git repository: every stage runs
and reports its metrics; a second `dvc repro` does nothing; an experiment that changes one quantization
param (`dvc exp run -S`) re-runs only that method's branch and what is downstream of it."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from pipeline_helpers import REPO, dvc, make_dvc_repo, run


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = make_dvc_repo(tmp_path_factory.mktemp("dvc_repo"))
    result = run([dvc(), "repro"], root)
    return root, result.stdout


def test_dvc_yaml_stages_match_params():
    """dvc.yaml's stages fan out over the profile's methods and variants."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["tokenize", "pretrain", "qat", "quantize", "evaluate", "evaluate_quant", "report",
                            "export"]
    assert stages["quantize"]["foreach"] == "${quantize.methods}"
    assert set(stages["evaluate"]["foreach"]) == {"bf16", "qat"}


def test_repro_runs_every_stage(repo):
    root, out = repo
    methods = ["int4", "gptq"]
    expected = {"tokenize", "pretrain", "qat", "report", "export", "evaluate@bf16", "evaluate@qat",
                *(f"quantize@{m}" for m in methods), *(f"evaluate_quant@{m}" for m in methods)}
    assert ran_stages(out) == expected
    shown = json.loads(run([dvc(), "metrics", "show", "--json"], root).stdout)
    metrics = {path: entry["data"] for path, entry in shown[""]["data"].items()}
    pre = metrics["metrics/pretrain.json"]
    assert pre["completed"] is True and pre["val_ppl"] > 1 and pre["valid_unigram_ppl"] > 1
    for variant in ["bf16", "qat", *methods]:
        assert metrics[f"metrics/evaluate_{variant}.json"]["variant"] == variant
        assert metrics["metrics/report.json"][variant]["ppl"] > 1
    assert metrics["metrics/quantize_gptq.json"]["bits_per_weight"] < 8
    assert "| gptq |" in (root / "reports" / "comparison.md").read_text()
    assert (root / "outputs" / "exports" / "int4" / "config.json").is_file()


def test_second_repro_does_nothing(repo):
    root, _ = repo
    result = run([dvc(), "repro"], root)
    assert ran_stages(result.stdout) == set(), result.stdout
    assert "up to date" in run([dvc(), "status"], root).stdout


def test_exp_run_changes_only_one_branch(repo):
    root, _ = repo
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "first run"], root)
    result = run([dvc(), "exp", "run", "-S", "quantize.methods.gptq.bits=8"], root)
    assert ran_stages(result.stdout) == {"quantize@gptq", "evaluate_quant@gptq", "report", "export"}, result.stdout
    assert "quantize@int4" not in result.stdout or "didn't change" in result.stdout
    # the workspace now holds the experiment's results
    gptq = json.loads((root / "metrics" / "evaluate_gptq.json").read_text())
    assert gptq["bits_per_weight"] > 8
    shown = json.loads(run([dvc(), "exp", "show", "--json"], root).stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    assert experiments, shown
