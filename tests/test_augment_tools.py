"""tools/preview_augment.py and tools/bench_loader.py on a tiny generated config, through their main()."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from eval_fixtures import load_tool

needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia") is None
                                or importlib.util.find_spec("nvidia.dali") is None,
                                reason='DALI not installed (pip install "largefr[dali]")')


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    """A quickstart-like config over 4 generated identities of 16 images (32 px)."""
    root = tmp_path_factory.mktemp("augment_tools")
    config = {"data": {"loader": "dali", "image_size": 32, "num_workers": 1, "shuffle_buffer": 16,
                       "synthetic": {"identities": 4, "images_per_identity": 16, "val_pairs": 2,
                                     "heldout_identities": 0, "cache_dir": str(root / "data")}},
              "model": {"network": "mbf", "embedding_size": 32}, "train": {"batch_size": 8},
              "output": str(root / "run")}
    path = root / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("loader", [pytest.param("dali", marks=needs_dali), "torch"])
def test_preview_writes_pairs_of_original_and_augmented_rows(tiny_config, tmp_path, loader, capsys):
    out = str(tmp_path / "grid.png")
    tool = load_tool("preview_augment")
    assert tool.main(["--config", tiny_config, "--out", out, "--rows", "2", "--columns", "3", "--zoom", "2",
                      "--loader", loader, "--set", "data.augment.grayscale_prob=1.0", "data.random_flip=false"]) == 0
    labelled = np.asarray(Image.open(out).convert("RGB"))
    cell, gap = 32 * 2, 2
    margin = labelled.shape[1] - (3 * (cell + gap) + gap)
    assert margin > 0 and (labelled[:, :margin] < 128).any()  # the rows are named in a left margin
    grid = labelled[:, margin:]
    assert grid.shape == (4 * (cell + gap) + gap, 3 * (cell + gap) + gap, 3)
    rows = [[grid[gap + r * (cell + gap):][:cell, gap + c * (cell + gap):][:, :cell] for c in range(3)]
            for r in range(4)]
    for original, augmented in zip(rows[0::2], rows[1::2]):
        for before, after in zip(original, augmented):
            assert not (before == before[..., :1]).all()  # colored as stored
            assert (after == after[..., :1]).all()  # the same image in gray below it
            luma = before.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
            assert np.abs(after[..., 0] - luma).max() <= 1.0
    assert "augmentation on: grayscale_prob" in capsys.readouterr().out


@pytest.mark.parametrize("loaders", [pytest.param("dali,torch", marks=needs_dali), "torch"])
def test_bench_loader_times_both_settings(tiny_config, tmp_path, loaders, capsys):
    report = str(tmp_path / "bench.json")
    tool = load_tool("bench_loader")
    assert tool.main(["--config", tiny_config, "--loaders", loaders, "--batches", "2", "--warmup", "1",
                      "--rounds", "2", "--json", report]) == 0
    measured = json.loads(open(report).read())
    assert set(measured["images_per_second"]) == set(loaders.split(","))
    for rates in measured["images_per_second"].values():
        assert len(rates["off"]) == len(rates["on"]) == 2 and min(rates["off"] + rates["on"]) > 0
    assert measured["augment_fields"]["blur_prob"] == 0.2  # the arcface_torch set
    table = capsys.readouterr().out
    assert "on/off" in table and all(kind in table for kind in loaders.split(","))
    with pytest.raises(SystemExit, match="fewer than --warmup"):
        tool.main(["--config", tiny_config, "--loaders", "torch", "--batches", "50", "--rounds", "1"])
