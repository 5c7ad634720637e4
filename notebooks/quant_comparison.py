# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quantization comparison
#
# The evaluation of every model variant (the bf16 baseline, QAT, each quantization method) of the **latest
# pipeline execution**, read back from MLflow: the `evaluate@<variant>` stage runs nested under the newest
# parent run (`moai.role = pipeline`) that has any, and the registered model's `champion` alias.
#
# Settings (environment variables):
# - `MLFLOW_TRACKING_URI`: where the runs are (default: the local store `sqlite:///<repo>/mlruns.db`);
# - `MOAI_EXPERIMENT` (default `moai`), `MOAI_MODEL_NAME` (default `moai-mamba`), `MOAI_PIPELINE_ID` (default:
#   the latest pipeline with evaluations).
#
# Open it with `jupytext --to ipynb notebooks/quant_comparison.py` (the `.ipynb` is not committed), or run it
# headless: `jupytext --to ipynb --execute notebooks/quant_comparison.py`.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException


def repo_root(start: Path) -> Path:
    """The nearest directory holding params.yaml (the run root), else the start directory."""
    for d in (start, *start.parents):
        if (d / "params.yaml").is_file():
            return d
    return start


ROOT = repo_root(Path.cwd().resolve())
TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlruns.db'}"
EXPERIMENT = os.environ.get("MOAI_EXPERIMENT", "moai")
MODEL_NAME = os.environ.get("MOAI_MODEL_NAME", "moai-mamba")
PIPELINE_ID = os.environ.get("MOAI_PIPELINE_ID")
client = MlflowClient(tracking_uri=TRACKING_URI, registry_uri=TRACKING_URI)
print(f"tracking: {TRACKING_URI}  experiment: {EXPERIMENT}  model: {MODEL_NAME}")

# %% [markdown]
# ## The latest pipeline execution and its evaluation runs

# %%
experiment = client.get_experiment_by_name(EXPERIMENT)
if experiment is None:
    raise SystemExit(f"no experiment {EXPERIMENT!r} at {TRACKING_URI}: run the pipeline first")
pipeline_filter = "tags.`moai.role` = 'pipeline'"
if PIPELINE_ID:
    pipeline_filter += f" and tags.`moai.pipeline_id` = '{PIPELINE_ID}'"
parents = client.search_runs([experiment.experiment_id], pipeline_filter, order_by=["attributes.start_time DESC"])

parent, evaluations = None, []
for candidate in parents:
    evaluations = client.search_runs(
        [experiment.experiment_id],
        f"tags.`mlflow.parentRunId` = '{candidate.info.run_id}' and tags.`moai.stage_kind` = 'evaluate' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"])
    if evaluations:
        parent = candidate
        break
if parent is None:
    raise SystemExit("no finished evaluate stage runs in any pipeline run: run the evaluate stages first")
print(f"pipeline {parent.data.tags['moai.pipeline_id']} (parent run {parent.info.run_id}, "
      f"git {parent.data.tags.get('moai.git_commit', '?')[:12]}): {len(evaluations)} evaluation runs")

# %% [markdown]
# ## The comparison table
#
# One row per variant (the newest evaluation of each); Δppl is relative to the bf16 baseline. The method of a
# variant comes from its registered model version when there is one.

# %%
methods = {}
try:
    for version in client.search_model_versions(f"name = '{MODEL_NAME}'"):
        methods.setdefault(version.tags.get("variant"), version.tags.get("method"))
except MlflowException:
    pass

rows = {}
for run in evaluations:  # newest first: keep the first run per variant
    stage = run.data.tags.get("moai.stage", run.info.run_name or "")
    variant = run.data.tags.get("variant") or stage.partition("@")[2] or stage
    if variant not in rows:
        rows[variant] = {"variant": variant, "method": run.data.tags.get("method") or methods.get(variant) or variant,
                         **run.data.metrics}
table = pd.DataFrame(list(rows.values())).set_index("variant").sort_values("size_mb")
if "bf16" in table.index and "ppl" in table:
    table["delta_ppl_pct"] = 100 * (table["ppl"] / table.loc["bf16", "ppl"] - 1)
columns = [c for c in ("method", "bits_per_weight", "size_mb", "ppl", "delta_ppl_pct", "prefill_tok_s",
                       "decode_tok_s", "peak_mem_mb") if c in table]
columns += sorted(c for c in table if c.startswith("ppl_"))
display(table[columns])

# %% [markdown]
# ## Perplexity against size, and speed per method

# %%
fig, ax = plt.subplots(figsize=(6, 4))
ax.scatter(table["size_mb"], table["ppl"])
for variant, row in table.iterrows():
    ax.annotate(f"{variant} ({row['method']})", (row["size_mb"], row["ppl"]), textcoords="offset points",
                xytext=(4, 4))
ax.set_xlabel("size on disk (MB)")
ax.set_ylabel("validation perplexity")
ax.set_title("perplexity vs size")
ax.grid(alpha=0.3)
plt.show()

# %%
speed = [c for c in ("prefill_tok_s", "decode_tok_s") if c in table]
if speed:
    fig, axes = plt.subplots(1, len(speed), figsize=(5 * len(speed), 4), squeeze=False)
    for ax, column in zip(axes[0], speed, strict=True):
        labels = [f"{v}\n({m})" for v, m in zip(table.index, table["method"], strict=True)]
        ax.bar(labels, table[column])
        ax.set_title(column.replace("_tok_s", " tokens/s"))
        ax.set_ylabel("tokens/s")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## The champion

# %%
try:
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
except MlflowException:
    champion = None
if champion is None:
    display(Markdown(f"No `champion` alias on `{MODEL_NAME}` yet: run `moai promote --params params.yaml`."))
else:
    rule = client.get_registered_model(MODEL_NAME).tags.get("moai.champion_rule", "")
    display(Markdown(f"**champion**: `{MODEL_NAME}` version {champion.version} = variant "
                     f"`{champion.tags.get('variant')}` ({champion.tags.get('method')}); rule: {rule}"))
    print(f"champion: {champion.tags.get('variant')} (version {champion.version})")
