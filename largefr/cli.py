"""What every tool shares: the flag vocabulary, renamed flags, how a user's error ends a tool, JSON reports.

One name per meaning (README "Tool flags"). A tool declares a renamed option once, with its old spelling::

    add_option(parser, "--bins", renamed_from=("--bin",), nargs="+", required=True, help="...")

The old spelling still works and prints one warning naming the new one; help shows only the new name.
tests/test_tool_flags.py builds every tool's parser and fails on a spelling listed in SYNONYMS that is
not such a renamed alias.

`run_tool(name, body)` runs a tool's body: an error the user can fix (`largefr.errors.EXPECTED_ERRORS`)
becomes one line, `name: error: message`, and an exit status; anything else is a bug and keeps its
traceback. `write_json` writes a tool's report atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Mapping, Sequence

from largefr.errors import EXPECTED_ERRORS

VOCABULARY: dict[str, str] = {
    "--config": "a training config file (JSON or YAML)",
    "--set": "config overrides KEY=VALUE",
    "--out": "the output path or folder",
    "--json": "a JSON report path",
    "--png": "a plot path",
    "--checkpoint": "a training checkpoint folder",
    "--weights": "an exported backbone file (or checkpoint) to embed with",
    "--bins": "one or more verification .bin files",
    "--rec": "a .rec file or a folder of shards",
    "--images": "an image folder",
    "--batch-size": "images per forward, per process (the help says the scope)",
    "--precision": "fp32, bf16 or fp16",
    "--world": "number of ranks (processes) of a distributed run",
    "--workers": "worker processes or threads for parallel work",
    "--image-size": "the model's input size in pixels",
    "--embedding-size": "the embedding dimension",
    "--seed": "the random seed",
    "--steps": "number of steps",
    "--classes": "number of classes",
    "--progress-every": "seconds between progress lines",
}
"""Flag -> meaning: every tool uses these names for these meanings."""

SYNONYMS: dict[str, str] = {
    "--bin": "--bins", "--check-bin": "--bins", "--bin-files": "--bins",
    "--batch": "--batch-size", "--bs": "--batch-size",
    "--dtype": "--precision",
    "--ranks": "--world", "--world-size": "--world", "--nprocs": "--world",
    "--output": "--out", "--output-dir": "--out", "--out-dir": "--out",
    "--num-workers": "--workers", "--jobs": "--workers",
    "--size": "--image-size", "--img-size": "--image-size", "--input-size": "--image-size",
    "--dim": "--embedding-size", "--emb-size": "--embedding-size",
    "--ckpt": "--checkpoint", "--model": "--weights",
    "--num-classes": "--classes", "--num-steps": "--steps", "--image-dir": "--images", "--plot": "--png",
    "--cfg": "--config",
}
"""Other spellings of vocabulary flags: a tool may accept one only as a renamed alias (add_option)."""

PRECISION_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""torch dtype names that --dtype took, as --precision values (for renamed --dtype options)."""


def _renamed_action(base: type[argparse.Action], new: str, old_spellings: Sequence[str]) -> type[argparse.Action]:
    class RenamedAction(base):  # type: ignore[misc, valid-type]
        renamed_from = tuple(old_spellings)

        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                     option_string: str | None = None) -> None:
            if option_string in self.renamed_from:
                print(f"{parser.prog}: warning: {option_string} is renamed {new}; the old spelling is accepted "
                      "until the next release", file=sys.stderr)
            super().__call__(parser, namespace, values, option_string)

    return RenamedAction


def add_option(parser: argparse.ArgumentParser | Any, name: str, *, renamed_from: Sequence[str] = (),
               old_values: Mapping[str, str] | None = None, **kwargs: Any) -> argparse.Action:
    """parser.add_argument(name, **kwargs), also accepting each spelling of `renamed_from` with a warning.

    `old_values` maps values the old option took to the new ones (e.g. PRECISION_NAMES for --dtype).
    `parser` may be an argument group.
    """
    if old_values:
        convert = kwargs.pop("type", str)
        kwargs["type"] = lambda text: convert(old_values.get(text, text))
    if renamed_from:
        registry = parser._registry_get("action", kwargs.get("action"), kwargs.get("action"))  # "store", ...
        kwargs["action"] = _renamed_action(registry, name, renamed_from)
        kwargs.setdefault("dest", name.lstrip("-").replace("-", "_"))
    action = parser.add_argument(name, *renamed_from, **kwargs)
    action.option_strings = [name]  # help and errors name the new spelling; parsing still knows the old ones
    return action


def int_list(text: str) -> list[int]:
    """argparse type of a comma-separated list of positive integers (`--classes 100000,1000000`, `--world 1,2`)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need at least one integer, all >= 1")
    return values


def run_tool(name: str, body: Callable[[], int | None], *, error_status: int = 2) -> int:
    """`body()`'s exit status (None: 0); a user's error is printed as `name: error: ...` and gives `error_status`.
    LARGEFR_DEBUG=1 shows its traceback instead."""
    try:
        return body() or 0
    except EXPECTED_ERRORS as error:
        if os.environ.get("LARGEFR_DEBUG"):
            raise
        print(f"{name}: error: {error}", file=sys.stderr)
        return error_status


def write_json(path: str, payload: Any) -> None:
    """Write `payload` as indented JSON, atomically (a reader never sees half a report)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
        handle.write("\n")
    os.replace(tmp, path)
