"""The comparison report: a CSV and a Markdown table of every variant's metrics, and PNG plots.

    paths = write_report([metrics_bf16, metrics_qat, metrics_gptq, ...], "reports")
    print(markdown_table(results))

Inputs are the flat dicts of `evaluate_variant`. Outputs (every file written to a temporary sibling and
renamed into place, so a reader sees the old file or the new one, never half of one):

    <out_dir>/comparison.csv            one row per variant, the columns of `COLUMNS` + per-language perplexity
    <out_dir>/comparison.md             the same table in Markdown
    <out_dir>/plots/ppl_vs_size.png     perplexity against size on disk, one point per variant (legend)
    <out_dir>/plots/speed.png           prefill and decode tokens/s per variant (labelled with its method)

Δppl is relative to the variant named `baseline` ("bf16": the pretrained model), in percent; blank when
there is no such row.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import PipelineError

BASELINE = "bf16"
# (column, header, format) — per-language perplexity columns go after "ppl" / "Δppl".
COLUMNS = (
    ("variant", "variant", "{}"),
    ("method", "method", "{}"),
    ("bits_per_weight", "bits/weight", "{:.3f}"),
    ("model_bits_per_weight", "model bits/weight", "{:.2f}"),
    ("size_mb", "size MB", "{:.3f}"),
    ("ppl", "ppl", "{:.3f}"),
    ("delta_ppl_pct", "Δppl vs bf16 %", "{:+.2f}"),
    ("prefill_tok_s", "prefill tok/s", "{:.0f}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("peak_mem_mb", "peak mem MB", "{:.1f}"),
    ("device", "device", "{}"),
)


def languages(results: Sequence[dict]) -> list[str]:
    """Languages with a perplexity in any result (keys `ppl_<lang>`), sorted."""
    return sorted({k.removeprefix("ppl_") for r in results for k in r if k.startswith("ppl_")})


def comparison_rows(results: Sequence[dict], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """One dict per variant with the table's columns (raw values; None where a value is missing)."""
    if not results:
        raise PipelineError("report: no evaluation results; run the evaluate stage for at least one variant")
    names = [r.get("variant") for r in results]
    missing = [i for i, n in enumerate(names) if not n]
    if missing:
        raise PipelineError(f"report: result {missing[0]} has no 'variant' name")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PipelineError(f"report: variant(s) {', '.join(dupes)} appear more than once")
    base = next((r for r in results if r["variant"] == baseline), None)
    base_ppl = base.get("ppl") if base else None
    langs = languages(results)
    rows = []
    for r in results:
        row = {key: r.get(key) for key, _, _ in COLUMNS}
        ppl = r.get("ppl")
        row["delta_ppl_pct"] = (100 * (ppl / base_ppl - 1) if _finite(ppl) and _finite(base_ppl) and base_ppl > 0
                                else None)
        for lang in langs:
            row[f"ppl_{lang}"] = r.get(f"ppl_{lang}")
        rows.append(row)
    return rows


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _columns(results: Sequence[dict]) -> list[tuple[str, str, str]]:
    cols = list(COLUMNS)
    at = [c[0] for c in cols].index("delta_ppl_pct") + 1
    cols[at:at] = [(f"ppl_{lang}", f"ppl {lang}", "{:.3f}") for lang in languages(results)]
    return cols


def _fmt(value, fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(results: Sequence[dict], baseline: str = BASELINE) -> str:
    """The comparison table as GitHub Markdown (the string printed at the end of a pipeline run)."""
    rows, cols = comparison_rows(results, baseline), _columns(results)
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "|".join("---" if k in ("variant", "method", "device") else "---:" for k, _, _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[k], f).replace("|", "\\|") for k, _, f in cols) + " |")
    return "\n".join(lines) + "\n"


def comparison_csv(results: Sequence[dict], baseline: str = BASELINE) -> str:
    """The comparison table as CSV (full-precision numbers, header = column keys)."""
    rows, cols = comparison_rows(results, baseline), _columns(results)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([k for k, _, _ in cols])
    for row in rows:
        writer.writerow(["" if row[k] is None else row[k] for k, _, _ in cols])
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def plot_ppl_vs_size(results: Sequence[dict]):
    """Perplexity against size on disk (log x over a wide range), one point per variant (legend); returns the
    figure."""
    from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend needed

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    points = [(r["size_mb"], r["ppl"], r["variant"]) for r in results
              if _finite(r.get("size_mb")) and _finite(r.get("ppl"))]
    markers = "os^Dv<>p*hX"
    for i, (size, ppl, name) in enumerate(points):
        ax.scatter(size, ppl, s=40, marker=markers[i % len(markers)], label=name)
    if points and min(p[0] for p in points) > 0 and max(p[0] for p in points) > 20 * min(p[0] for p in points):
        ax.set_xscale("log")
    if points:
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Perplexity vs size")
    ax.grid(True, alpha=0.3)
    return fig


def plot_speed(results: Sequence[dict]):
    """Prefill and decode tokens/s per variant (grouped bars, log y), x labels "variant (method)"."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.4, 1.1 * len(results) + 2), 4.4))
    axes = fig.subplots(1, 2)
    labels = [f"{r['variant']}\n({r.get('method', '')})" for r in results]
    for ax, key, title in zip(axes, ("prefill_tok_s", "decode_tok_s"), ("prefill", "decode"), strict=True):
        values = [r.get(key) if _finite(r.get(key)) else 0.0 for r in results]
        ax.bar(range(len(values)), values, color="tab:blue" if key == "prefill_tok_s" else "tab:orange")
        ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title} tokens/s ({results[0].get('device', '?')})")
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def write_report(results: list[dict], out_dir: str | os.PathLike, baseline: str = BASELINE) -> dict[str, Path]:
    """Write comparison.csv, comparison.md and plots/{ppl_vs_size,speed}.png into `out_dir` (each atomically).

    Returns {"csv": path, "markdown": path, "plot_ppl_vs_size": path, "plot_speed": path}.
    """
    out = Path(out_dir)
    # Render everything before writing anything: a bad result fails with no file changed.
    csv_text = comparison_csv(results, baseline)
    md_text = "# Quantization comparison\n\n" + markdown_table(results, baseline)
    ppl_png, speed_png = _png(plot_ppl_vs_size(results)), _png(plot_speed(results))
    return {
        "csv": _atomic_write(out / "comparison.csv", csv_text.encode("utf-8")),
        "markdown": _atomic_write(out / "comparison.md", md_text.encode("utf-8")),
        "plot_ppl_vs_size": _atomic_write(out / "plots" / "ppl_vs_size.png", ppl_png),
        "plot_speed": _atomic_write(out / "plots" / "speed.png", speed_png),
    }
