"""A .rec changed under a running job, read by the real DALI CPU pipeline on 2 real ranks: every rank stops at its
next batch naming the file (docs/RELIABILITY.md, 'Data changed under the job'). Before, DALI's memory-mapped
reader died of SIGBUS ("Fatal Python error: Bus error", no file named) or a raw DALI traceback."""
from __future__ import annotations

import json
import os
import signal

import pytest

from tests.test_reliability_faults import Ranks, _copy_data, fast_config, wait_for
from tests.test_trainer import tiny_data  # noqa: F401  (a fixture)


def _change(rec: str, how: str) -> str:
    if how == "truncated":
        os.truncate(rec, os.path.getsize(rec) // 2)
        return "truncated during the run"
    os.remove(rec)
    return "deleted or moved during the run"


@pytest.mark.parametrize("how", ["truncated", pytest.param("deleted", marks=pytest.mark.slow)])
def test_a_rec_changed_mid_run_under_dali_stops_every_rank_naming_it(tiny_data, tmp_path, how):  # noqa: F811
    pytest.importorskip("nvidia.dali")
    data = _copy_data(tiny_data, tmp_path / "data")
    output = tmp_path / "out"
    config = fast_config(data, str(output), data={"loader": "dali"}, logging={"every": 1000},
                         train={"max_steps": 40, "collective_timeout_s": 30}, checkpoint={"every": 2})
    ranks = Ranks(tmp_path, config)
    wait_for(lambda: (output / "checkpoints" / "step_2" / "manifest.json").is_file(), 150, ranks)
    for proc in ranks.procs:  # both stopped while the file changes: neither is past its next check
        os.kill(proc.pid, signal.SIGSTOP)
    expected = _change(os.path.join(data, "train.rec"), how)
    for proc in ranks.procs:
        os.kill(proc.pid, signal.SIGCONT)
    codes = ranks.wait(90)
    for rank in range(2):
        output_text = ranks.output(rank)
        assert codes[rank] == 1, (codes, output_text[-3000:])
        assert f"[rank {rank}] error: {data}/train.rec: {expected}" in output_text, output_text[-3000:]
        assert "Bus error" not in output_text and "Traceback" not in output_text
    assert not (output / "summary.json").exists()


def test_bench_dali_reader_times_both_settings(tiny_data, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("nvidia.dali")
    from tests.eval_fixtures import load_tool

    report_path = tmp_path / "bench.json"
    assert load_tool("bench_dali_reader").main(["--rec", tiny_data, "--batch-size", "8", "--batches", "3",
                                                "--rounds", "1", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    for label in ("reader alone", "reader + CPU decode"):
        assert report[label]["mmap"] > 0 and report[label]["plain_io"] > 0
        rates = report[label]
        assert rates["ratio_plain_io_to_mmap"] == pytest.approx(rates["plain_io"] / rates["mmap"])
    assert "reader + CPU decode" in capsys.readouterr().out
