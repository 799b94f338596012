"""One flag vocabulary for every tool: each tool's real argparse parser is collected and checked, and a renamed
flag's old spelling still parses, with one warning (largefr/cli.py)."""
from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from largefr.cli import SYNONYMS, VOCABULARY, add_option

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = sorted([*ROOT.glob("tools/*.py"), ROOT / "launch" / "train.py"])
PENDING = {("scale_classes.py", "--batch"): "a GLOBAL batch in the lead's tools/scale_classes.py, to be renamed there"}
"""Synonyms still in use, each with the reason; the list only shrinks."""
BATCH_SCOPE = re.compile(r"per process|per rank|one process|global", re.IGNORECASE)


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def tool_parser(path: Path, monkeypatch) -> argparse.ArgumentParser:
    """The parser `main` of the tool at `path` builds, caught as it starts parsing (nothing else runs)."""
    name = f"largefr_tool_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses of the tool look their module up there
    spec.loader.exec_module(module)

    def capture(parser, *args, **kwargs):
        raise _Captured(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Captured) as caught:
        module.main(["--help"])
    monkeypatch.undo()
    return caught.value.parser


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=lambda p: p.name)
def test_every_tool_speaks_the_vocabulary(path, monkeypatch):
    parser = tool_parser(path, monkeypatch)
    problems = []
    for spelling, action in parser._option_string_actions.items():
        renamed = getattr(action, "renamed_from", ())
        if spelling in renamed:
            if action.option_strings != [SYNONYMS.get(spelling, action.option_strings[0])]:
                problems.append(f"{spelling} is renamed {action.option_strings}, not the vocabulary's "
                                f"{SYNONYMS[spelling]}")
        elif spelling in SYNONYMS and (path.name, spelling) not in PENDING:
            problems.append(f"{spelling}: say {SYNONYMS[spelling]} ({VOCABULARY[SYNONYMS[spelling]]}); keep the old "
                            "spelling with largefr.cli.add_option(..., renamed_from=...)")
        if spelling == "--batch-size" and not BATCH_SCOPE.search(action.help or ""):
            problems.append(f"--batch-size help {action.help!r} does not say its scope (per process / global)")
    assert not problems, f"{path.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_synonyms_point_into_the_vocabulary():
    assert set(SYNONYMS.values()) <= set(VOCABULARY) and not set(SYNONYMS) & set(VOCABULARY)


def test_an_old_spelling_still_parses_with_one_warning(monkeypatch, capsys):
    parser = tool_parser(ROOT / "tools" / "export_backbone.py", monkeypatch)
    old = parser.parse_args(["--checkpoint", "c", "--out", "m.pt", "--dtype", "bfloat16"])
    assert capsys.readouterr().err.splitlines() == [
        f"{parser.prog}: warning: --dtype is renamed --precision; the old spelling is accepted until the next release"]
    assert old == parser.parse_args(["--checkpoint", "c", "--out", "m.pt", "--precision", "bf16"])
    assert capsys.readouterr().err == ""
    assert "--dtype" not in parser.format_help()


def test_a_required_renamed_option_is_satisfied_by_either_spelling(capsys):
    parser = argparse.ArgumentParser(prog="tool")
    add_option(parser, "--bins", renamed_from=("--bin",), nargs="+", required=True)
    assert parser.parse_args(["--bin", "a.bin"]).bins == ["a.bin"]
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "the following arguments are required: --bins" in capsys.readouterr().err
