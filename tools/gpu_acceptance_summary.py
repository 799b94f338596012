"""summary.md and summary.json of a tools/gpu_acceptance.sh run, from the files its steps left in OUT.

    python tools/gpu_acceptance_summary.py --out OUT [--dry-run 0|1] [--budget SECONDS]

Reads OUT/steps.jsonl (one line per step: status, seconds, reason), machine.json, gpu_tests.xml
(pytest's junit file), profile.json and profile.log (tools/profile_step.py), bench_head_<dtype>.json
(tools/bench_head.py). Prints what was skipped and why; exit code 1 when a step failed or timed out.
No torch import: it must work when the machine's torch is what broke.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
import xml.etree.ElementTree as ElementTree

FAILED_STATUSES = ("failed", "timeout")


def read_json(path: str) -> dict | None:
    """The file's JSON; None when a step left none, or a cut one (killed while writing)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_steps(out: str) -> list[dict]:
    with open(os.path.join(out, "steps.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


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
    return {"tests": len(cases), "failed": len(failed), "skipped": skipped_count,
            "passed": len(cases) - len(failed) - skipped_count, "failures": failures, "skip_reasons": skips}


def profile_table(out: str) -> str:
    """The phase table tools/profile_step.py printed (from the line starting 'phase' to the end of its report)."""
    path = os.path.join(out, "profile.log")
    if not os.path.exists(path):
        return ""
    with open(path) as handle:
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


def bench_numbers(out: str) -> dict:
    results = {}
    for path in sorted(glob.glob(os.path.join(out, "bench_head_*.json"))):
        report = read_json(path)
        if report is None:
            continue
        rank = report["ranks"][0]
        results[report["dtype"]] = {"classes": report["classes"], "batch_per_rank": report["batch_per_rank"],
                                    "dim": report["dim"], "machine": report["machine"], "step_ms": rank["step_ms"],
                                    "gemm_ms": rank["gemm_ms"], "gemm_floor_ratio": rank["gemm_floor_ratio"],
                                    "peak_mem_mb": rank["peak_mem_mb"]}
    return results


def build_summary(out: str, *, dry_run: bool, budget: int) -> dict:
    steps = read_steps(out)
    return {"date": time.strftime("%Y-%m-%d"), "dry_run": dry_run, "budget_seconds": budget,
            "total_seconds": sum(s["seconds"] for s in steps), "machine": read_json(os.path.join(out, "machine.json")),
            "steps": steps, "gpu_tests": junit_results(os.path.join(out, "gpu_tests.xml")),
            "profile": profile_numbers(read_json(os.path.join(out, "profile.json"))), "bench_head": bench_numbers(out),
            "failed_steps": [s["step"] for s in steps if s["status"] in FAILED_STATUSES],
            "skipped_steps": {s["step"]: s["reason"] for s in steps if s["status"] == "skipped"}}


def _number(value, pattern: str) -> str:
    return "n/a" if value is None else format(value, pattern)


def format_markdown(summary: dict, table: str) -> str:
    machine = summary["machine"] or {}
    mode = "dry run (CPU, tiny shapes)" if summary["dry_run"] else "GPU run"
    lines = [f"# GPU acceptance, {mode}, {summary['date']}", "",
             f"Machine: {machine.get('device', '?')}; Python {machine.get('python', '?')}, "
             f"torch {machine.get('torch', '?')} (CUDA {machine.get('cuda')}); "
             f"{summary['total_seconds']} s of a {summary['budget_seconds']} s budget.", "",
             "| step | status | seconds | note |", "|---|---|---:|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['reason']} |" for s in summary["steps"]]
    tests = summary["gpu_tests"]
    if tests is not None:
        lines += ["", f"GPU tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped "
                      f"of {tests['tests']}."]
        lines += [f"- {f['kind']}: `{f['test']}`: {f['message']}" for f in tests["failures"]]
        lines += [f"- skipped ({count}): {reason}" for reason, count in tests["skip_reasons"].items()]
    profile = summary["profile"]
    if profile is not None:
        config = profile["config"]
        lines += ["", f"Profile: {config['network']} at {config['image_size']} px, {config['precision']}, "
                      f"{config['loader']} loader, global batch {profile['global_batch']}: "
                      f"{profile['images_per_sec']:.1f} images/s, MFU {_number(profile['mfu'], '.1%')}.", "", "```",
                  table, "```"]
    for dtype, bench in summary["bench_head"].items():
        lines.append(f"Head C = {bench['classes']}, B = {bench['batch_per_rank']}, d = {bench['dim']}, {dtype}: "
                     f"step {bench['step_ms']:.2f} ms, GEMM floor ratio {bench['gemm_floor_ratio']:.2f}, "
                     f"peak {bench['peak_mem_mb']:.1f} MiB ({bench['machine']}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the OUT folder of the run")
    parser.add_argument("--dry-run", type=int, choices=(0, 1), default=0)
    parser.add_argument("--budget", type=int, default=450)
    args = parser.parse_args(argv)
    summary = build_summary(args.out, dry_run=bool(args.dry_run), budget=args.budget)
    with open(os.path.join(args.out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    markdown = format_markdown(summary, profile_table(args.out))
    with open(os.path.join(args.out, "summary.md"), "w") as handle:
        handle.write(markdown)
    print(markdown)
    for step, reason in summary["skipped_steps"].items():
        print(f"skipped {step}: {reason}")
    if summary["failed_steps"]:
        print(f"FAILED: {', '.join(summary['failed_steps'])} (logs in {args.out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
