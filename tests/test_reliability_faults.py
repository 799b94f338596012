"""Reliability under faults, on real parts: 2 gloo ranks, DeepSpeed engines, a generated data set.

Faults are injected through the clearly marked hooks `train.debug_inject_nan_steps` (NaN loss on one
rank) and `$LARGEFR_DEBUG_KILL_IN_SAVE` (SIGKILL mid-checkpoint), or by `kill -9` of a real rank.
Unit-level non-finite and SIGTERM behaviour is in tests/test_trainer.py; not repeated here.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from largefr.distributed.spawn import free_port
from tests.distributed_helpers import run_distributed
from tests.test_trainer import tiny_config, tiny_data  # noqa: F401  (tiny_data is a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"data": {"val_targets": []}, "cluster": {"queue_size": 64, "num_sampled_centers": 8}}


def fast_config(data_dir: str, output: str, **sections) -> dict:
    config = tiny_config(data_dir, output, **FAST)
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return config


# ---------------------------------------------------------------------------- spawned ranks


class Ranks:
    """`world` real `python launch/train.py` processes wired by env variables (no launcher to rescue them)."""

    def __init__(self, tmp_path, config: dict, world: int = 2, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, tag: str = "run"):
        path = tmp_path / f"{tag}.json"
        path.write_text(json.dumps(config))
        port = str(free_port())
        self.logs = [tmp_path / f"{tag}.rank{r}.log" for r in range(world)]
        self.procs = []
        for rank in range(world):
            rank_env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world),
                            LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=port, **(env or {}))
            with open(self.logs[rank], "w") as log:
                self.procs.append(subprocess.Popen([sys.executable, "launch/train.py", "--config", str(path), *args],
                                                   cwd=ROOT, env=rank_env, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"rank {self.procs.index(proc)} still running after {timeout} s (hang):\n"
                            + self.output(self.procs.index(proc))[-3000:])
        return codes

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text()


def wait_for(predicate, timeout: float, ranks: Ranks) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline or any(p.poll() is not None for p in ranks.procs):
            ranks.kill()
            pytest.fail("condition not reached:\n" + ranks.output(0)[-3000:])
        time.sleep(0.2)


# ---------------------------------------------------------------------------- non-finite loss


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    head = trainer.runner.head
    state = {"weight": head.margin_head.weight, "queue": head.queue.features, "queue_labels": head.queue.labels,
             "centers": head.bank.centers, "phi": head.bank.phi,
             **{f"backbone.{n}": p for n, p in trainer.runner.engine.module.named_parameters()}}
    return {k: v.detach().clone() for k, v in state.items()}


def _train_recording(rank: int, world: int, config_dict: dict) -> dict:
    from largefr.config import Config
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed

    env = init_distributed()
    trainer = build_trainer(Config.from_dict(config_dict, world_size=world), env)
    trainer.loss_history = []
    original, changed = trainer.run_step, []

    def recording_step(micro_batches):
        before = _snapshot(trainer)
        result = original(micro_batches)
        after = _snapshot(trainer)
        changed.append({k: not torch.equal(before[k], after[k]) for k in before})
        return result

    trainer.run_step = recording_step
    summary = trainer.train()
    trainer.metrics.close()
    return {"changed": changed, "summary": summary, "losses": [float(x) for x in trainer.loss_history]}


def test_nan_on_one_rank_skips_the_step_everywhere_without_touching_queue_or_bank(tiny_data, tmp_path):
    config = fast_config(tiny_data, str(tmp_path / "out"), train={"max_steps": 3, "debug_inject_nan_steps": [2],
                                                                  "debug_inject_nan_rank": 1})
    per_rank = run_distributed(_train_recording, 2, config)
    for rank, result in enumerate(per_rank):
        step1, step2, step3 = result["changed"]
        assert all(step1.values()) and all(step3.values()), (rank, step1, step3)
        assert not any(step2.values()), f"rank {rank}: the skipped step changed {[k for k, v in step2.items() if v]}"
        assert result["summary"]["skipped_nonfinite_steps"] == 1 and result["summary"]["steps"] == 3
        assert torch.isnan(torch.tensor(result["losses"][1])) and all(map(torch.isfinite, torch.tensor(
            [result["losses"][0], result["losses"][2]])))
    log = (tmp_path / "out" / "train.log").read_text()
    assert "step 2: non-finite loss in 1 micro-batch(es), skipped (1 so far)" in log


@pytest.mark.parametrize("case", ["consecutive limit", "abort policy"])
def test_nonfinite_abort_exits_every_rank_nonzero(tiny_data, tmp_path, case):
    train = {"max_steps": 5, "debug_inject_nan_rank": 1}
    if case == "consecutive limit":  # steps 2 and 3 skipped; 3 > limit 1 -> abort
        train.update(debug_inject_nan_steps=[2, 3], max_consecutive_nonfinite=1)
        expected = "2 consecutive steps with a non-finite loss (limit train.max_consecutive_nonfinite=1)"
    else:
        train.update(debug_inject_nan_steps=[2], on_nonfinite="abort")
        expected = "set train.on_nonfinite=skip"
    ranks = Ranks(tmp_path, fast_config(tiny_data, str(tmp_path / "out"), train=train))
    codes = ranks.wait(timeout=120)
    for rank, code in enumerate(codes):
        assert code == 1, ranks.output(rank)[-3000:]
        assert f"[rank {rank}] error: " in ranks.output(rank) and expected in ranks.output(rank)
    assert not (tmp_path / "out" / "summary.json").exists()  # no partial output claims a finished run


# ---------------------------------------------------------------------------- determinism


def _losses(rank: int, world: int, config_dict: dict) -> list[float]:
    return _train_recording(rank, world, config_dict)["losses"]


@pytest.mark.slow
def test_same_seed_gives_identical_losses_over_20_steps(tiny_data, tmp_path):
    runs = []
    for name in ("a", "b"):
        config = fast_config(tiny_data, str(tmp_path / name), train={"max_steps": 20},
                             schedule={"epochs": 10}, logging={"every": 5})
        runs.append(run_distributed(_losses, 2, config))
    assert len(runs[0][0]) == 20 and all(map(torch.isfinite, torch.tensor(runs[0][0])))
    for rank in (0, 1):
        assert runs[0][rank] == runs[1][rank]  # bit-identical, not approximately equal
    assert runs[0][0] == runs[0][1]  # the loss is global


# ---------------------------------------------------------------------------- killed rank, killed save


def _steps_in_log(text: str) -> list[str]:
    """'step N/M | loss ... ' of every step line (throughput and timing fields dropped)."""
    lines = [line[line.index("step "):].split(" | ") for line in text.splitlines() if "| loss " in line]
    return [f"{fields[0]} | {next(f for f in fields if f.startswith('loss '))}" for fields in lines]


def _final_head(output) -> dict[str, torch.Tensor]:
    folder = max((output / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1].split(".")[0]))
    return {p.name: torch.load(p, weights_only=True) for p in sorted(folder.glob("head_*"))}


def _assert_same_heads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        for key, value in a[name].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, b[name][key], rtol=0, atol=0, msg=f"{name}:{key}")


@pytest.mark.slow
def test_killed_rank_ends_every_rank_and_rerun_resumes_to_the_same_state(tiny_data, tmp_path):
    train = {"max_steps": 8, "collective_timeout_s": 20}
    straight_out = tmp_path / "straight"
    assert Ranks(tmp_path, fast_config(tiny_data, str(straight_out), train=train, checkpoint={"every": 2}),
                 tag="straight").wait(180) == [0, 0]

    output = tmp_path / "killed"
    config = fast_config(tiny_data, str(output), train=train, checkpoint={"every": 2, "keep_last": 10})
    ranks = Ranks(tmp_path, config, tag="first")
    wait_for(lambda: (output / "checkpoints" / "step_4" / "manifest.json").is_file(), 180, ranks)
    os.kill(ranks.procs[1].pid, signal.SIGKILL)
    started = time.monotonic()
    codes = ranks.wait(timeout=60)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, ranks.output(0)[-3000:]
    assert time.monotonic() - started < 20 + 30  # within the collective timeout (+ teardown)
    assert "[rank 0] error: a collective failed: another rank ended" in ranks.output(0), ranks.output(0)[-3000:]
    assert not (output / "summary.json").exists()

    rerun = Ranks(tmp_path, config, args=("--resume", "auto"), tag="rerun")
    assert rerun.wait(180) == [0, 0], rerun.output(0)[-3000:]
    assert "resum" in (output / "train.log").read_text().lower()
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 8
    _assert_same_heads(_final_head(output), _final_head(straight_out))
    straight_steps = _steps_in_log((straight_out / "train.log").read_text())
    assert straight_steps[-1] in _steps_in_log((output / "train.log").read_text())  # same final logged loss


@pytest.mark.slow
def test_kill_during_checkpoint_save_keeps_the_previous_one_resumable(tiny_data, tmp_path):
    output = tmp_path / "out"
    config = fast_config(tiny_data, str(output), train={"max_steps": 6, "collective_timeout_s": 20},
                         checkpoint={"every": 2, "keep_last": 10})
    ranks = Ranks(tmp_path, config, env={"LARGEFR_DEBUG_KILL_IN_SAVE": "4:1"}, tag="killed")
    codes = ranks.wait(timeout=120)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, ranks.output(0)[-3000:]
    names = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert "step_2" in names and "step_4" not in names and any(n.startswith("step_4.tmp-") for n in names), names

    from largefr.checkpoint.save_load import find_latest_checkpoint

    assert find_latest_checkpoint(str(output / "checkpoints")).endswith("step_2")  # half-written one never picked
    rerun = Ranks(tmp_path, config, args=("--resume", "auto"), tag="rerun")
    assert rerun.wait(120) == [0, 0], rerun.output(0)[-3000:]
    assert json.loads((output / "summary.json").read_text())["steps"] == 6
    assert (output / "checkpoints" / "step_4" / "manifest.json").is_file()


# ---------------------------------------------------------------------------- bad input, every rank exits


def _copy_data(source: str, target) -> str:
    import shutil

    shutil.copytree(source, target)
    return str(target)


def _index(data: str) -> dict[int, int]:
    with open(os.path.join(data, "train.idx")) as idx:
        return {int(key): int(offset) for key, offset in (line.split() for line in idx if line.strip())}


def _write_index(data: str, lines: list[str]) -> None:
    with open(os.path.join(data, "train.idx"), "w") as idx:
        idx.write("".join(line + "\n" for line in lines))


def _patch_rec(data: str, offset: int, payload: bytes) -> None:
    with open(os.path.join(data, "train.rec"), "r+b") as rec:
        rec.seek(offset)
        rec.write(payload)


FRAME, IR_HEADER = 8, 24  # RecordIO frame (magic, length); IRHeader (flag, label, id, id2)


def _corrupt_image_starts(data: str) -> None:
    """Zero the first bytes of image key 1: not an image at all, found by the scan every rank makes."""
    _patch_rec(data, _index(data)[1] + FRAME + IR_HEADER, b"\0" * 64)


def _garble_image_bodies(data: str) -> None:
    """Keep the JPEG signature of every 4th image of keys 1-64 but zero the rest: passes the scan, fails in
    the decoder. Keys 1-64 are rank 0's shard in epoch 0 (of 2 ranks), so rank 0 alone meets them, mid-run,
    while rank 1 waits in a collective; 16 such images in rank 0's 64 make every 6-step run read one.
    """
    import struct

    with open(os.path.join(data, "train.rec"), "r+b") as rec:
        for key, offset in _index(data).items():
            if 1 <= key <= 64 and key % 4 == 1:
                rec.seek(offset + 4)
                length = struct.unpack("<I", rec.read(4))[0] & ((1 << 29) - 1)
                rec.seek(offset + FRAME + IR_HEADER + 4)
                rec.write(b"\0" * (length - IR_HEADER - 4))


def _set_label(data: str, key: int, label: float) -> None:
    import struct

    _patch_rec(data, _index(data)[key] + FRAME + 4, struct.pack("<f", label))


def _make_bad_data(case: str, data: str) -> tuple[dict, str]:
    """Damage `data` (a copy of tiny_data) for `case`; the config overrides and the text the error must hold."""
    import struct

    index = _index(data)
    lines = [f"{key}\t{offset}" for key, offset in index.items()]
    rec_size = os.path.getsize(os.path.join(data, "train.rec"))
    if case == "not an image (scan)":
        _corrupt_image_starts(data)
        return {}, "train.rec key 1 (offset"
    if case == "undecodable image, torch loader" or case == "undecodable image, dali loader":
        _garble_image_bodies(data)
        return {"data": {"loader": case.split(", ")[1].split()[0]}}, "undecodable image"
    if case == "truncated rec":
        with open(os.path.join(data, "train.rec"), "r+b") as rec:
            rec.truncate(rec_size // 2)
        return {}, "the .rec is truncated"
    if case == "wrong magic":
        _patch_rec(data, index[1], struct.pack("<I", 0xDEADBEEF))
        return {}, f"train.rec key 1: wrong magic 0xdeadbeef at offset {index[1]}"
    if case == "idx offset past the end":
        _write_index(data, [f"1\t{rec_size + 1000}" if key == 1 else line for key, line in zip(index, lines)])
        return {}, f"train.idx: key 1 points at offset {rec_size + 1000}, past the end"
    if case == "duplicate idx key":
        _write_index(data, lines + [f"1\t{index[2]}"])
        return {}, "train.idx: duplicate key 1"
    if case == "missing idx key":
        _write_index(data, [line for key, line in zip(index, lines) if key != 5])
        return {}, "train.idx: image key 5 (of 1 missing) is absent"
    if case == "negative label":
        _set_label(data, 9, -1.0)
        return {}, "train.rec key 9: label -1 is outside [0, 16)"
    if case == "label >= num_classes":
        _set_label(data, 9, 16.0)
        return {}, "train.rec key 9: label 16 is outside [0, 16)"
    if case == "property mismatch":
        return {"data": {"num_classes": 12}}, "property: says 16 classes but the config has data.num_classes=12"
    if case == "empty data set":
        from largefr.data.recordio import write_insightface_rec

        for name in ("train.rec", "train.idx", "property"):
            os.remove(os.path.join(data, name))
        write_insightface_rec(data, [], num_classes=16, image_size=(32, 32))
        return {}, "train.rec: holds no usable image records"
    if case == "shard smaller than one batch":
        # the config gives no count, so only the 128 images counted in the data show the problem
        return ({"train": {"batch_size": 80}, "cluster": {"queue_size": 256},
                 "data": {"num_images": None, "num_classes": None}},
                "128 images give no full batch of train.batch_size 80 x world size 2")
    if case == "num_images overstated":
        return {"data": {"num_images": 1000}}, "holds 128 usable images but the config has data.num_images=1000"
    if case == "world size > num_classes":
        return {"data": {"num_classes": 1}}, "num_classes"
    if case == "pickled callable in a .bin":
        marker = os.path.join(data, "payload_ran")
        import pickle

        with open(os.path.join(data, "synth_val.bin"), "wb") as f:
            pickle.dump(_Payload(marker), f)
        return {"data": {"val_targets": ["synth_val"]}}, "synth_val.bin"
    raise AssertionError(case)


BAD_INPUT_CASES = ["not an image (scan)", "undecodable image, torch loader", "undecodable image, dali loader",
                   "truncated rec", "wrong magic", "idx offset past the end", "duplicate idx key", "missing idx key",
                   "negative label", "label >= num_classes", "property mismatch", "empty data set",
                   "shard smaller than one batch", "num_images overstated", "world size > num_classes", "pickled callable in a .bin"]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_exits_every_rank_nonzero_in_bounded_time(tiny_data, tmp_path, case):
    if "dali" in case:
        pytest.importorskip("nvidia.dali")
    data = _copy_data(tiny_data, tmp_path / "data")
    overrides, expected = _make_bad_data(case, data)
    overrides["train"] = {"max_steps": 6, "collective_timeout_s": 20, **overrides.get("train", {})}
    ranks = Ranks(tmp_path, fast_config(data, str(tmp_path / "out"), **overrides))
    started = time.monotonic()
    codes = ranks.wait(timeout=90)
    outputs = [ranks.output(r) for r in range(2)]
    assert all(code != 0 for code in codes), (codes, [o[-2000:] for o in outputs])
    assert time.monotonic() - started < 90
    # the rank that met the problem names it; data checked at start-up is named by every rank
    reporters = [r for r, o in enumerate(outputs) if f"[rank {r}] error:" in o and expected in o]
    assert len(reporters) == (1 if "undecodable" in case else 2), [o[-2000:] for o in outputs]
    for r in set(range(2)) - set(reporters):  # a rank left waiting in a collective says so, without a traceback
        assert f"[rank {r}] error: a collective failed: another rank ended" in outputs[r], outputs[r][-2000:]
        assert "Traceback" not in outputs[r]
    assert not (tmp_path / "out" / "summary.json").exists()
    assert not os.path.exists(os.path.join(data, "payload_ran"))  # nothing from a data file was executed


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_undecodable_images_are_skipped_counted_and_logged(tiny_data, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    data = _copy_data(tiny_data, tmp_path / "data")
    _garble_image_bodies(data)
    _corrupt_image_starts(data)
    config = fast_config(data, str(tmp_path / "out"), data={"loader": loader, "on_bad_image": "skip", "num_images": 127},
                         train={"max_steps": 6}, logging={"every": 3})
    ranks = Ranks(tmp_path, config)
    assert ranks.wait(timeout=120) == [0, 0], [ranks.output(r)[-2000:] for r in range(2)]
    log = ranks.output(0)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "data: 1 records that are not images are left out" in log
    reported = [int(n) for n in re.findall(r"undecodable image\(s\) skipped since the last report, (\d+) in this", log)]
    assert reported and reported == sorted(reported) and reported[-1] == summary["skipped_images"] > 0
    assert summary["steps"] == 6


# ---------------------------------------------------------------------------- bad checkpoints on resume


class _Payload:
    """Pickles as a call of open(marker, 'w'): loading it without restriction creates the marker."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):  # noqa: F811  (tiny_data is the imported fixture)
    folder = tmp_path_factory.mktemp("trained")
    config = fast_config(tiny_data, str(folder / "out"), train={"max_steps": 2})
    assert Ranks(folder, config).wait(120) == [0, 0]
    return folder / "out", config


def _plant_in_replicated(step_dir, marker: str) -> None:
    from largefr.checkpoint.files import file_digest, safe_load

    path = step_dir / "replicated.pt"
    state = safe_load(str(path))
    state["payload"] = _Payload(marker)
    torch.save(state, path)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"]["replicated.pt"] = file_digest(str(path))  # consistent manifest: only the pickle is bad
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("case", ["pickled callable in replicated.pt", "other embedding size", "other num_classes",
                                  "truncated head file"])
def test_bad_checkpoint_on_resume_exits_every_rank_nonzero(trained_run, tmp_path, case):
    import shutil

    output = tmp_path / "out"
    shutil.copytree(trained_run[0], output)
    config = {**trained_run[1], "output": str(output)}
    config["train"] = {**config["train"], "max_steps": 4, "collective_timeout_s": 20}
    step_dir = output / "checkpoints" / "step_2"
    marker = str(tmp_path / "payload_ran")
    if case == "pickled callable in replicated.pt":
        _plant_in_replicated(step_dir, marker)
        expected = "replicated.pt"
    elif case == "other embedding size":
        config["model"] = {**config["model"], "embedding_size": 8}
        expected = "was written with model.embedding_size=16, this run has 8"
    elif case == "other num_classes":  # the same images declared as 20 classes (the property file agrees)
        data = _copy_data(config["data"]["rec"], tmp_path / "data")
        with open(os.path.join(data, "property"), "w") as f:
            f.write("20,32,32\n")
        config["data"] = {**config["data"], "rec": data, "num_classes": 20}
        expected = "was written with data.num_classes=16, this run has 20"
    else:  # 'auto' skips a half-written checkpoint by design; a named one must say what is wrong
        head = next(step_dir.glob("head_*"))
        head.write_bytes(head.read_bytes()[:100])
        expected = head.name
    resume = str(step_dir) if case == "truncated head file" else "auto"
    ranks = Ranks(tmp_path, config, args=("--resume", resume))
    codes = ranks.wait(timeout=90)
    outputs = [ranks.output(r) for r in range(2)]
    assert all(code != 0 for code in codes), (codes, [o[-2000:] for o in outputs])
    assert all(f"[rank {r}] error:" in o and expected in o for r, o in enumerate(outputs)), [o[-2000:] for o in outputs]
    assert not os.path.exists(marker)  # refused, nothing executed
    assert not (output / "summary.json").exists() or json.loads((output / "summary.json").read_text())["steps"] == 2
