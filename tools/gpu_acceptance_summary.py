"""Summary and packing of a tools/gpu_acceptance.sh run: what comes back from the device's $OUT.

    python tools/gpu_acceptance_summary.py --work WORK --out OUT [--dry-run 0|1] [--budget SECONDS] [--quiet]

Reads the files the steps left in WORK: steps.jsonl (one line per step: status, seconds, reason),
machine.json, gpu_tests.xml (pytest's junit file; gpu_tests.log's `-v` lines when pytest was killed
before writing it), throughput.json (tools/gpu_throughput.py), profile.json and profile.log
(tools/profile_step.py), bench_head_<dtype>.json (tools/bench_head.py). Writes OUT/summary.json,
OUT/summary.md and OUT/results.tar.gz (every file of WORK, each cut to LOG_KEEP_BYTES), and checks OUT
against the device's limits on what comes back (OUT_MAX_FILES files, each under OUT_MAX_FILE_BYTES,
at most OUT_MAX_DEPTH folders down). The script calls it after every step, so a run killed at its
time limit still returns everything up to its last finished step. Exit code 1 when a step failed or
timed out. No torch import: it must work when the machine's torch is what broke.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree

FAILED_STATUSES = ("failed", "timeout")
OUT_MAX_FILES = 8
"""The device tool brings back at most 8 files from $OUT ..."""
OUT_MAX_FILE_BYTES = 16 * 2**20
"""... each under 16 MiB ..."""
OUT_MAX_DEPTH = 2
"""... at most two folders down ($OUT/a/b/file comes back, $OUT/a/b/c/file does not)."""
ARCHIVE = "results.tar.gz"
LOG_KEEP_BYTES = 2 * 2**20
"""Bytes of each file kept in the archive (its first quarter and last three quarters when longer)."""
TEST_LINE = re.compile(r"^(?P<test>\S+::\S+) (?P<outcome>PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def read_json(path: str) -> dict | None:
    """The file's JSON; None when a step left none, or a cut one (killed while writing)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_steps(work: str) -> list[dict]:
    path = os.path.join(work, "steps.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ---------------------------------------------------------------------------------------------- tests
def junit_results(path: str) -> dict | None:
    """Counts, failed test ids with their first message line, and skip reasons of a pytest junit file."""
    try:
        root = ElementTree.parse(path).getroot()
    except (FileNotFoundError, ElementTree.ParseError):  # no file, or one cut by a killed pytest
        return None
    failures, skips = [], {}
    cases = list(root.iter("testcase"))
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            for problem in case.findall(tag):
                message = (problem.get("message") or problem.text or "").strip().splitlines()
                failures.append({"test": name, "kind": tag, "message": message[0][:300] if message else ""})
        for skipped in case.findall("skipped"):
            reason = (skipped.get("message") or "").strip()
            skips[reason] = skips.get(reason, 0) + 1
    failed = {f["test"] for f in failures}
    skipped_count = sum(skips.values())
    return {"source": "junit", "tests": len(cases), "failed": len(failed), "skipped": skipped_count,
            "passed": len(cases) - len(failed) - skipped_count, "failures": failures, "skip_reasons": skips}


def log_results(path: str) -> dict | None:
    """The same counts from pytest's `-v` lines, for a pytest killed before it wrote its junit file."""
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as handle:
        outcomes = {m["test"]: m["outcome"] for line in handle if (m := TEST_LINE.match(line))}
    failures = [{"test": test, "kind": outcome.lower(), "message": "see gpu_tests.log"}
                for test, outcome in outcomes.items() if outcome in ("FAILED", "ERROR")]
    skipped = sum(outcome == "SKIPPED" for outcome in outcomes.values())
    return {"source": "log (pytest was stopped before writing its junit file)", "tests": len(outcomes),
            "failed": len(failures), "skipped": skipped, "passed": len(outcomes) - len(failures) - skipped,
            "failures": failures, "skip_reasons": {}}


def results_of_tests(work: str, step: str) -> dict | None:
    return junit_results(os.path.join(work, f"{step}.xml")) or log_results(os.path.join(work, f"{step}.log"))


# ---------------------------------------------------------------------------------------------- numbers
def profile_table(work: str) -> str:
    """The phase table tools/profile_step.py printed (from the line starting 'phase' to the end of its report)."""
    path = os.path.join(work, "profile.log")
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as handle:
        lines = handle.read().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("phase ")]
    return "\n".join(lines[starts[-1]:]) if starts else ""


def profile_numbers(report: dict | None) -> dict | None:
    if report is None:
        return None
    mfu = report.get("mfu") or {}
    return {"config": report["config"], "global_batch": report["global_batch"], "step_ms": report["step_seconds"] * 1e3,
            "images_per_sec": report["images_per_sec"], "data_wait_fraction": report["data_wait_fraction"],
            "peak_memory_mib": [r["peak_memory_bytes"] / 2**20 for r in report["ranks"]],
            "mfu": mfu.get("mfu"), "achieved_tflops_per_rank": mfu.get("achieved_tflops_per_rank"),
            "device_name": mfu.get("device_name", report.get("device"))}


def bench_numbers(work: str) -> dict:
    results = {}
    for path in sorted(glob.glob(os.path.join(work, "bench_head_*.json"))):
        report = read_json(path)
        if report is None:
            continue
        rank = report["ranks"][0]
        results[report["dtype"]] = {"classes": report["classes"], "batch_per_rank": report["batch_per_rank"],
                                    "dim": report["dim"], "machine": report["machine"], "step_ms": rank["step_ms"],
                                    "gemm_ms": rank["gemm_ms"], "gemm_floor_ratio": rank["gemm_floor_ratio"],
                                    "peak_mem_mb": rank["peak_mem_mb"]}
    return results


def build_summary(work: str, *, dry_run: bool, budget: int) -> dict:
    steps = read_steps(work)
    return {"date": time.strftime("%Y-%m-%d"), "dry_run": dry_run, "budget_seconds": budget,
            "total_seconds": sum(s["seconds"] for s in steps if s["step"] != "comm_op"),
            "machine": read_json(os.path.join(work, "machine.json")), "steps": steps,
            "gpu_tests": results_of_tests(work, "gpu_tests"), "gpu_compile": results_of_tests(work, "gpu_compile"),
            "throughput": read_json(os.path.join(work, "throughput.json")),
            "profile": profile_numbers(read_json(os.path.join(work, "profile.json"))),
            "bench_head": bench_numbers(work),
            "failed_steps": [s["step"] for s in steps if s["status"] in FAILED_STATUSES],
            "skipped_steps": {s["step"]: s["reason"] for s in steps if s["status"] == "skipped"}}


# ---------------------------------------------------------------------------------------------- markdown
def _number(value, pattern: str) -> str:
    return "n/a" if value is None else format(value, pattern)


def _tests_lines(title: str, tests: dict | None) -> list[str]:
    if tests is None:
        return []
    lines = ["", f"{title}: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped "
                 f"of {tests['tests']} (from the {tests['source']})."]
    lines += [f"- {f['kind']}: `{f['test']}`: {f['message']}" for f in tests["failures"]]
    return lines + [f"- skipped ({count}): {reason}" for reason, count in tests["skip_reasons"].items()]


def _throughput_lines(report: dict | None) -> list[str]:
    if report is None:
        return []
    memory, config = report["peak_memory_mib"], report["config"]
    return ["", f"Throughput (uninstrumented, {report['steps']} steps after {report['warmup']}): "
                f"{config['network']} at {config['image_size']} px, {config['precision']}, "
                f"global batch {report['global_batch']}: **{report['images_per_sec']:.1f} images/s**, "
                f"{report['step_seconds'] * 1e3:.1f} ms/step, MFU {_number(report['mfu'], '.1%')}; peak memory "
                f"allocated {_number(memory['allocated'], '.0f')} MiB, "
                f"reserved {_number(memory['reserved'], '.0f')} MiB.",
            f"MFU: {report['mfu_definition']}"]


def format_markdown(summary: dict, table: str) -> str:
    machine = summary["machine"] or {}
    mode = "dry run (CPU, tiny shapes)" if summary["dry_run"] else "GPU run"
    lines = [f"# GPU acceptance, {mode}, {summary['date']}", "",
             f"Machine: {machine.get('device', '?')}; Python {machine.get('python', '?')}, "
             f"torch {machine.get('torch', '?')} (CUDA {machine.get('cuda')}); "
             f"{summary['total_seconds']} s of a {summary['budget_seconds']} s budget. Logs: {ARCHIVE}.", "",
             "| step | status | seconds | note |", "|---|---|---:|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['reason']} |" for s in summary["steps"]]
    lines += _tests_lines("GPU tests", summary["gpu_tests"]) + _tests_lines("Compile tests", summary["gpu_compile"])
    lines += _throughput_lines(summary["throughput"])
    profile = summary["profile"]
    if profile is not None:
        config = profile["config"]
        lines += ["", f"Phase table (instrumented: the device is synchronised at every phase boundary): "
                      f"{config['network']} at {config['image_size']} px, {config['precision']}, {config['loader']} "
                      f"loader, global batch {profile['global_batch']}: {profile['images_per_sec']:.1f} images/s.",
                  "", "```", table, "```"]
    for dtype, bench in summary["bench_head"].items():
        lines.append(f"Head C = {bench['classes']}, B = {bench['batch_per_rank']}, d = {bench['dim']}, {dtype}: "
                     f"step {bench['step_ms']:.2f} ms, GEMM floor ratio {bench['gemm_floor_ratio']:.2f}, "
                     f"peak {bench['peak_mem_mb']:.1f} MiB ({bench['machine']}).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- packing
def _kept_bytes(path: str) -> bytes:
    """The file, or its first quarter and last three quarters of LOG_KEEP_BYTES with a note between."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        if size <= LOG_KEEP_BYTES:
            return handle.read()
        head = handle.read(LOG_KEEP_BYTES // 4)
        handle.seek(size - LOG_KEEP_BYTES * 3 // 4)
        tail = handle.read()
    note = f"\n[... {size - len(head) - len(tail)} bytes cut by gpu_acceptance_summary.py ...]\n".encode()
    return head + note + tail


def write_archive(work: str, path: str) -> None:
    """Every file of WORK (each cut to LOG_KEEP_BYTES) in one gzipped tar, written beside and renamed."""
    partial = path + ".partial"
    with tarfile.open(partial, "w:gz") as archive:
        for folder, _, files in os.walk(work):
            for name in sorted(files):
                full = os.path.join(folder, name)
                data = _kept_bytes(full)
                info = tarfile.TarInfo(os.path.relpath(full, work))
                info.size, info.mtime = len(data), int(os.path.getmtime(full))
                archive.addfile(info, io.BytesIO(data))
    os.replace(partial, path)


def out_problems(out: str) -> list[str]:
    """What in OUT would not come back from the device (too many files, too large, too deep)."""
    files = [os.path.join(folder, name) for folder, _, names in os.walk(out) for name in names]
    problems = [f"{len(files)} files in {out}; at most {OUT_MAX_FILES} come back"] if len(files) > OUT_MAX_FILES else []
    for path in files:
        relative = os.path.relpath(path, out)
        if os.path.getsize(path) >= OUT_MAX_FILE_BYTES:
            problems.append(f"{relative}: {os.path.getsize(path)} bytes, not under {OUT_MAX_FILE_BYTES}")
        if relative.count(os.sep) > OUT_MAX_DEPTH:
            problems.append(f"{relative}: more than {OUT_MAX_DEPTH} folders down")
    return problems


def write_out(work: str, out: str, *, dry_run: bool, budget: int) -> dict:
    """summary.json, summary.md and the archive in OUT; returns the summary."""
    summary = build_summary(work, dry_run=dry_run, budget=budget)
    write_archive(work, os.path.join(out, ARCHIVE))
    summary["out_problems"] = out_problems(out)
    with open(os.path.join(out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(format_markdown(summary, profile_table(work)))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="the folder the steps wrote their files to")
    parser.add_argument("--out", required=True, help="the folder that comes back from the device ($OUT)")
    parser.add_argument("--dry-run", type=int, choices=(0, 1), default=0)
    parser.add_argument("--budget", type=int, default=500)
    parser.add_argument("--quiet", action="store_true", help="write the files only (after each step)")
    args = parser.parse_args(argv)
    summary = write_out(args.work, args.out, dry_run=bool(args.dry_run), budget=args.budget)
    if args.quiet:
        return 0
    with open(os.path.join(args.out, "summary.md")) as handle:
        print(handle.read())
    for step, reason in summary["skipped_steps"].items():
        print(f"skipped {step}: {reason}")
    for problem in summary["out_problems"]:
        print(f"OUT PROBLEM: {problem}", file=sys.stderr)
    if summary["failed_steps"] or summary["out_problems"]:
        print(f"FAILED: {', '.join(summary['failed_steps'] + ['out'] * bool(summary['out_problems']))} "
              f"(logs in {os.path.join(args.out, ARCHIVE)})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
