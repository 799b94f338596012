"""The rooms of largefr import only what docs/DESIGN.md section 9's "may import" table allows.

The table is the rule: this test reads it from the document and every import of every module
under largefr/ (function-level and TYPE_CHECKING imports included, parsed with `ast`), and names the
file, the line and the forbidden arrow of each import the table does not allow.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "largefr"
DESIGN = ROOT / "docs" / "DESIGN.md"
SECTION = "## 9. Where things live"
NOTHING = "—"
"""What the "may import" cell of a room that imports nothing of largefr holds."""

KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}
"""(file under largefr/, imported room) -> why it is allowed for now (files being changed by others); empty once
issue 26 is done."""


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def read_table(text: str) -> tuple[dict[str, set[str]], dict[str, str]]:
    """(room -> the rooms it may import, module -> its room where they differ), from the "may import" table of
    section 9 (its largefr/ rows).

    A room is a folder (`largefr/heads/`) or a top-level module (`largefr/config.py`); the file names that follow
    it in the same cell without a folder (`config_loading.py`) belong to that room. The "may import" cell lists
    room names, comma-separated, with remarks in parentheses; NOTHING for none.
    """
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [_cells(line) for line in section.splitlines() if line.startswith("|")]
    header = [cell.lower() for cell in rows[0]]
    column = header.index("may import")
    table: dict[str, set[str]] = {}
    aliases: dict[str, str] = {}
    for row in rows[2:]:
        owners = re.findall(r"`([^`]+)`", row[0])
        if not owners or not owners[0].startswith("largefr/"):
            continue
        allowed = re.sub(r"\([^)]*\)", "", row[column])
        names = {name.strip() for name in allowed.split(",") if name.strip() and name.strip() != NOTHING}
        room = None
        for path in owners:
            if path.startswith("largefr/"):
                room = path.removeprefix("largefr/").removesuffix("/").removesuffix(".py")
                table[room] = set(names)
            else:  # another top-level file of the same room
                aliases[path.removesuffix(".py")] = room
    return table, aliases


def room_of(module: str, aliases: dict[str, str]) -> str:
    """'largefr.heads.joint' -> 'heads'; 'largefr.config_loading' -> 'config' (an alias); 'largefr' -> '__init__'."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    return aliases.get(name, name)


def module_name(path: Path, root: Path) -> str:
    """The dotted name of a file under `root` (the folder holding largefr/)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, imported largefr module) of every import statement in the file, at any depth."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module or ""))
    return [(line, name) for line, name in found if name == "largefr" or name.startswith("largefr.")]


def forbidden_imports(table: dict[str, set[str]], aliases: dict[str, str], paths: list[Path],
                      root: Path = ROOT) -> list[str]:
    """'file:line: room -> room (imports module)' for each import the table does not allow."""
    problems = []
    for path in paths:
        source = room_of(module_name(path, root), aliases)
        relative = path.relative_to(root / "largefr").as_posix()
        for line, imported in imports_of(path, root):
            target = room_of(imported, aliases)
            if target == source or (relative, target) in KNOWN_EXCEPTIONS:
                continue
            if source not in table:
                problems.append(f"largefr/{relative}:{line}: room '{source}' has no row in the table")
            elif target not in table:
                problems.append(f"largefr/{relative}:{line}: imports {imported}, of room '{target}' that the table "
                                "does not list")
            elif target not in table[source]:
                problems.append(f"largefr/{relative}:{line}: {source} -> {target} is not allowed (imports "
                                f"{imported}; {source} may import: {', '.join(sorted(table[source])) or 'nothing'})")
    return problems


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.fixture(scope="module")
def rules() -> tuple[dict[str, set[str]], dict[str, str]]:
    return read_table(DESIGN.read_text())


def test_every_room_of_the_package_has_a_row(rules):
    table, aliases = rules
    rooms = {room_of(module_name(path, ROOT), aliases) for path in package_files()}
    assert sorted(rooms - set(table)) == []
    unknown = {f"{room} -> {name}" for room, names in table.items() for name in names if name not in table}
    assert sorted(unknown) == []


def test_every_import_follows_the_table(rules):
    problems = forbidden_imports(*rules, package_files())
    assert not problems, "imports docs/DESIGN.md section 9 does not allow:\n" + "\n".join(problems)


def test_a_forbidden_import_is_named_with_file_line_and_arrow(rules, tmp_path):
    """A planted data -> train import (data/ never imports train/), inside a function, is found."""
    planted = tmp_path / "largefr" / "data" / "planted.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("import os\n\n\ndef prepare():\n    from largefr.train.build import build_trainer\n"
                       "    from . import prepare\n    return build_trainer, prepare\n")
    allowed = ", ".join(sorted(rules[0]["data"]))
    assert forbidden_imports(*rules, [planted], root=tmp_path) == [
        f"{planted.relative_to(tmp_path).as_posix()}:5: data -> train is not allowed (imports largefr.train.build; "
        f"data may import: {allowed})"]


def test_the_config_and_the_leaves_import_nothing_upward(rules):
    table = rules[0]
    """The directions the design fixes, whatever else the table says."""
    assert table["choices"] == set() and table["errors"] == set() and table["config"] <= {"choices", "errors"}
    assert "train" not in table["data"] and "perf" not in table["train"] and "perf" not in table["heads"]
    assert table["distributed"] == set() and table["models"] == set()
