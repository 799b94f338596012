"""Degenerate results are flagged: a collapsed embedding (every image alike) is warned about by evaluation and
marked in the ablation table; table.png's bars start at zero and its title says what a bar averages."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from largefr.data.verification_bin import write_bin
from largefr.eval.collapse import COLLAPSED_MEAN_COSINE, collapse_warning, mean_pairwise_cosine
from largefr.experiments.grids import Grid, Setting
from largefr.experiments.report import build_table, draw_table, format_markdown, table_from_markdown
from largefr.models import get_model
from tests.eval_fixtures import load_tool


def _brute_mean_cosine(rows: np.ndarray) -> float:
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    cosines = [float(unit[i] @ unit[j]) for i in range(len(unit)) for j in range(len(unit)) if i != j]
    return sum(cosines) / len(cosines)


@pytest.mark.parametrize("spread", [1.0, 1e-3])
def test_mean_pairwise_cosine_equals_the_brute_force(spread):
    rows = np.random.default_rng(0).normal(size=(30, 8)) * spread + np.arange(8)
    assert mean_pairwise_cosine(rows) == pytest.approx(_brute_mean_cosine(rows), abs=1e-12)
    assert (collapse_warning("set", mean_pairwise_cosine(rows), 30) is None) == (spread == 1.0)


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_evaluating_a_collapsed_model_warns(tmp_path, capsys):
    torch.manual_seed(0)
    model = get_model("mbf", embedding_size=16, image_size=32)
    state = model.state_dict()
    state["features.layers.3.weight"].zero_()  # the last BatchNorm1d: every image -> its bias, one direction
    state["features.layers.3.bias"].copy_(torch.linspace(-1, 1, 16))
    weights, bin_path = str(tmp_path / "collapsed.pt"), str(tmp_path / "pairs.bin")
    torch.save(state, weights)
    write_bin(bin_path, [_png(seed) for seed in range(40)], [pair % 2 == 0 for pair in range(20)])
    assert load_tool("eval_verification").main(["--weights", weights, "--bins", bin_path]) == 0
    out = capsys.readouterr().out
    assert ("warning: pairs: embeddings collapsed (mean pairwise cosine 1.0000 over 40 images, above 0.99): every "
            "image looks alike, the accuracy is chance, not a result") in out


def _table(seeds: list[int], collapsed_seed: int | None) -> dict:
    grid = Grid(name="g", settings=(Setting(name="arcface", overrides=()), Setting(name="cg", overrides=("x=1",))))
    results = []
    for setting, base in (("arcface", 0.9), ("cg", 0.92)):
        for seed in seeds:
            bad = setting == "cg" and seed == collapsed_seed
            results.append({"setting": setting, "seed": seed, "metrics": {
                "val/accuracy": 0.5 if bad else base + 0.001 * seed, "val/gap": 0.0 if bad else 0.6,
                "val/mean_cosine": 1.0 if bad else 0.1}})
    return build_table(grid, seeds, results, [])


def test_the_ablation_table_marks_collapsed_runs():
    table = _table([0, 1], collapsed_seed=1)
    assert [s["collapsed_seeds"] for s in table["settings"]] == [[], [1]]
    markdown = format_markdown(table)
    assert "| cg (COLLAPSED: seed 1) |" in markdown
    assert f"COLLAPSED: runs whose embeddings collapsed (mean pairwise cosine above {COLLAPSED_MEAN_COSINE}" in markdown
    assert "| arcface (COLLAPSED" not in markdown


def test_table_png_bars_start_at_zero_and_the_title_says_what_was_averaged():
    import matplotlib.pyplot as plt

    for seeds, title in (([0, 1, 2], "grid g: bar: mean over the finished runs of seeds 0,1,2; error bar: sample "
                                     "std over them"),
                         ([0], "grid g: one run per setting (seed 0), no spread to show")):
        fig = draw_table(_table(seeds, collapsed_seed=None))
        try:
            assert fig._suptitle.get_text() == title
            panels = [ax for ax in fig.axes if ax.get_title()]
            assert panels and all(ax.get_ylim()[0] <= 0 < ax.get_ylim()[1] for ax in panels)
        finally:
            plt.close(fig)


def test_a_figure_can_be_redrawn_from_its_markdown_table():
    table = _table([0, 1, 2], collapsed_seed=None)
    redrawn = table_from_markdown("# x\n" + format_markdown(table), "# x", grid="g", seeds=[0, 1, 2])
    assert [s["name"] for s in redrawn["settings"]] == ["arcface", "cg"]
    assert redrawn["headline_metrics"] == ["val/accuracy", "val/gap"]
    for original, parsed in zip(table["settings"], redrawn["settings"]):
        for metric in ("val/accuracy", "val/gap"):
            assert parsed["stats"][metric]["mean"] == pytest.approx(original["stats"][metric]["mean"], abs=1e-4)
            assert parsed["stats"][metric]["std"] == pytest.approx(original["stats"][metric]["std"], abs=1e-4)
