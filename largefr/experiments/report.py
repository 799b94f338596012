"""The grid's report: table.json (every run's values, per-setting statistics), table.md and table.png.

Per setting and metric: mean +- sample std over the finished seeds; per non-baseline setting: the
paired difference to the baseline over the seeds both finished, with a 95% t interval (n - 1 dof).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from largefr.cli import write_json
from largefr.eval.collapse import COLLAPSED_MEAN_COSINE, is_collapsed
from largefr.experiments.grids import Grid
from largefr.experiments.stats import CONFIDENCE, paired_difference, summarize

__all__ = ["build_table", "write_report", "headline_metrics", "format_markdown"]

_SCALES = {"accuracy": (100, 2, "acc %"), "tar": (100, 2, "TAR@FAR %"), "gap": (1, 3, "gap"),
           "positive_mean": (1, 3, "pos cos"), "negative_mean": (1, 3, "neg cos"), "kmeans_f": (100, 2, "kmeans F %"),
           "kmeans_nmi": (100, 2, "kmeans NMI %"), "dbscan_f": (100, 2, "DBSCAN F %"),
           "dbscan_nmi": (100, 2, "DBSCAN NMI %"), "wall_seconds": (1, 0, "wall s"), "mean_cosine": (1, 4, "mean cos")}
_HEADLINE = ("accuracy", "tar", "gap", "kmeans_f", "kmeans_nmi", "dbscan_f", "dbscan_nmi", "wall_seconds")


def _kind(metric: str) -> str:
    return metric.rsplit("/", 1)[-1]


def _metric_order(results: Sequence[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for result in results:
        seen.update(dict.fromkeys(result["metrics"]))
    return list(seen)


def headline_metrics(metrics: Sequence[str]) -> list[str]:
    """The columns of table.md and the panels of table.png: accuracy, TAR, gap per set; clustering; wall."""
    return [m for m in metrics if _kind(m) in _HEADLINE]


def collapsed(metrics: dict[str, float]) -> bool:
    """A run whose embeddings collapsed on some verification set (mean pairwise cosine above the limit)."""
    return any(is_collapsed(value) for name, value in metrics.items() if _kind(name) == "mean_cosine")


def _setting_entry(name: str, overrides: Sequence[str], runs: dict[int, dict], baseline: dict[int, dict] | None,
                   metrics: Sequence[str]) -> dict[str, Any]:
    values = {m: {seed: r["metrics"].get(m) for seed, r in runs.items()} for m in metrics}
    entry = {"name": name, "overrides": list(overrides), "finished": len(runs), "finished_seeds": sorted(runs),
             "collapsed_seeds": sorted(seed for seed, r in runs.items() if collapsed(r["metrics"])),
             "stats": {m: summarize(list(values[m].values())).as_dict() for m in metrics}, "paired": None}
    if baseline is not None:
        base = {m: {seed: r["metrics"].get(m) for seed, r in baseline.items()} for m in metrics}
        entry["paired"] = {m: paired_difference(values[m], base[m]).as_dict() for m in metrics}
    return entry


def build_table(grid: Grid, seeds: Sequence[int], results: Sequence[dict], failures: Sequence[dict]) -> dict[str, Any]:
    """table.json's content from the finished runs' result.json contents and the failure records."""
    metrics = _metric_order(results)
    by_setting = {s.name: {r["seed"]: r for r in results if r["setting"] == s.name} for s in grid.settings}
    baseline = by_setting[grid.baseline.name]
    settings = [_setting_entry(s.name, s.overrides, by_setting[s.name], None if i == 0 else baseline, metrics)
                for i, s in enumerate(grid.settings)]
    runs = [{"setting": r["setting"], "seed": r["seed"], "metrics": r["metrics"], "collapsed": collapsed(r["metrics"]),
             "train_seconds": r.get("train_seconds"), "checkpoint": r.get("checkpoint")} for r in results]
    return {"grid": grid.name, "baseline": grid.baseline.name, "seeds": list(seeds), "confidence": CONFIDENCE,
            "metrics": metrics, "headline_metrics": headline_metrics(metrics), "settings": settings, "runs": runs,
            "failures": list(failures)}


def _scaled(metric: str, value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    scale, digits, _ = _SCALES.get(_kind(metric), (1, 3, metric))
    return f"{scale * value:{'+' if signed else ''}.{digits}f}"


def _header(metric: str) -> str:
    prefix = metric.rsplit("/", 1)[0] if "/" in metric and not metric.startswith("heldout/") else ""
    label = _SCALES.get(_kind(metric), (1, 3, metric))[2]
    return f"{prefix} {label}".strip()


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [_row(header, widths), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(_row(r, widths) for r in rows)]


def _paired_cell(metric: str, paired: dict) -> str:
    if paired["mean"] is None:
        return "-"
    interval = (f" [{_scaled(metric, paired['low'], True)}, {_scaled(metric, paired['high'], True)}]"
                if paired["low"] is not None else " (n<2)")
    return _scaled(metric, paired["mean"], True) + interval


def _setting_label(setting: dict[str, Any]) -> str:
    """The setting's name, marked when some of its runs collapsed."""
    bad = setting.get("collapsed_seeds") or []
    return f"{setting['name']} (COLLAPSED: seed {','.join(map(str, bad))})" if bad else setting["name"]


def format_markdown(table: dict[str, Any]) -> str:
    columns, seeds = table["headline_metrics"], len(table["seeds"])
    header = ["setting", "seeds", *(_header(m) for m in columns)]
    means = [[_setting_label(s), f"{s['finished']}/{seeds}",
              *(f"{_scaled(m, s['stats'][m]['mean'])} +- {_scaled(m, s['stats'][m]['std'])}" for m in columns)]
             for s in table["settings"]]
    paired = [[_setting_label(s), str(s["paired"][columns[0]]["n"]) if columns else "0",
               *(_paired_cell(m, s["paired"][m]) for m in columns)] for s in table["settings"][1:]]
    lines = [f"# Grid {table['grid']}: {len(table['settings'])} settings x seeds "
             f"{','.join(map(str, table['seeds']))}, baseline {table['baseline']}", "",
             "Mean +- sample std over the finished seeds (percent for accuracy, TAR at FAR 1e-3, F and NMI).", "",
             *_markdown_table(header, means), "",
             f"Paired difference to {table['baseline']} (same seed), mean [95% t interval, n - 1 dof]; "
             "an interval that excludes 0 is beyond the seeds' noise.", "",
             *_markdown_table(["setting", "n", *header[2:]], paired)]
    if any(s.get("collapsed_seeds") for s in table["settings"]):
        lines += ["", f"COLLAPSED: runs whose embeddings collapsed (mean pairwise cosine above {COLLAPSED_MEAN_COSINE} on "
                  "a verification set): every image looks alike, so their accuracy is chance, not a result; train longer "
                  "or check the run"]
    if table["failures"]:
        lines += ["", "Failed runs:", *(f"- {f['setting']} seed {f['seed']}: {f['reason']} ({f['folder']})"
                                        for f in table["failures"])]
    return "\n".join(lines) + "\n"


def averaged_over(table: dict[str, Any]) -> str:
    """What a bar of table.png is: the mean over which seeds, and what its error bar is."""
    seeds = table["seeds"]
    if len(seeds) == 1:
        return f"one run per setting (seed {seeds[0]}), no spread to show"
    return f"bar: mean over the finished runs of seeds {','.join(map(str, seeds))}; error bar: sample std over them"


def draw_table(table: dict[str, Any]):
    """The figure of table.png: one panel per headline metric, a bar per setting (mean), error bar = sample std.

    Bars start at zero (differences are read from the table's intervals, not from a zoomed axis); a
    collapsed setting's bar is hatched grey and its name marked. The caller closes the figure.
    """
    from largefr.eval.plots import _pyplot

    plt = _pyplot()
    columns = table["headline_metrics"] or ["wall_seconds"]
    names = [s["name"] + (" (collapsed)" if s.get("collapsed_seeds") else "") for s in table["settings"]]
    cols = min(4, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, columns):
        scale = _SCALES.get(_kind(metric), (1, 3, metric))[0]
        stats = [s["stats"].get(metric, {"mean": None, "std": None}) for s in table["settings"]]
        means = [scale * (st["mean"] if st["mean"] is not None else math.nan) for st in stats]
        errors = [scale * (st["std"] or 0.0) for st in stats]
        bars = ax.bar(range(len(names)), means, yerr=errors, capsize=3, color="tab:blue", alpha=0.8)
        for bar, setting in zip(bars, table["settings"]):
            if setting.get("collapsed_seeds"):
                bar.set_hatch("//")
                bar.set_color("tab:gray")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize="small")
        ax.set_title(_header(metric), fontsize="medium")
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.suptitle(f"grid {table['grid']}: {averaged_over(table)}", fontsize="medium")
    fig.tight_layout()
    return fig


def plot_table(table: dict[str, Any], out_path: str) -> None:
    """table.png: `draw_table`'s figure."""
    from largefr.eval.plots import _pyplot

    fig = draw_table(table)
    try:
        fig.savefig(out_path, dpi=110)
    finally:
        _pyplot().close(fig)


def write_report(table: dict[str, Any], out: Path) -> None:
    """table.json, table.md and table.png in `out`."""
    write_json(str(out / "table.json"), table)
    (out / "table.md").write_text(format_markdown(table))
    plot_table(table, str(out / "table.png"))


def table_from_markdown(text: str, after: str, *, grid: str, seeds: Sequence[int]) -> dict[str, Any]:
    """The plottable part of a table (means and stds per setting) from the first means table of `format_markdown`'s
    form ('| setting | seeds | <set> acc % | ... |', cells 'mean +- std') that follows the line containing `after`.

    For redrawing a report's figure where only its markdown survives (docs/EXPERIMENTS.md's tables).
    """
    kinds = {label: kind for kind, (_, _, label) in _SCALES.items()}
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    header_at = next(i for i in range(start, len(lines)) if lines[i].startswith("| setting"))
    cells = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]  # noqa: E731
    metrics = []
    for column in cells(lines[header_at])[2:]:
        label = next(label for label in sorted(kinds, key=len, reverse=True) if column.endswith(label))
        prefix = column[:-len(label)].strip()
        kind = kinds[label]
        metrics.append(f"{prefix}/{kind}" if prefix else (kind if kind == "wall_seconds" else f"heldout/{kind}"))
    settings = []
    for line in lines[header_at + 2:]:
        if not line.startswith("|"):
            break
        row = cells(line)
        stats = {}
        for metric, cell in zip(metrics, row[2:]):
            scale = _SCALES[_kind(metric)][0]
            mean, _, std = cell.partition("+-")
            stats[metric] = {"mean": float(mean) / scale, "std": float(std) / scale if std.strip() else None}
        settings.append({"name": row[0], "stats": stats, "collapsed_seeds": []})
    return {"grid": grid, "seeds": list(seeds), "headline_metrics": metrics, "settings": settings}
