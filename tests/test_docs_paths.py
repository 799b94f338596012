"""Every file path and `largefr.` module the docs, docstrings and comments name exists in the tree.

Paths: `largefr/...`, `tools/...`, `launch/...`, `tests/...`, `docs/...`, `configs/...` written in
README/docs Markdown and in Python files (docstrings, comments, strings). A name followed by a glob or
a template (`configs/wf42m_*_vit.py`, `tools/<name>.py`) is a pattern, not a path, and is passed over.
Modules: dotted names `largefr.<package>.<module>[.<name>]` resolve to a package or module, and the first name after
the module is defined at its top level (read with `ast`; nothing is imported).
"""
from __future__ import annotations

import ast
import functools
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED_FOLDERS = ("largefr", "tools", "launch", "tests", "docs")
SUFFIXES = (".md", ".py", ".sh")

PATH_PATTERN = re.compile(r"(?<![\w./-])(?:largefr|tools|launch|tests|docs|configs)/[\w./-]*[\w/]")
PATTERN_MARKS = "*{<"
"""A path followed (after any '.', '-', '/') by one of these is a glob or a template."""
MODULE_PATTERN = re.compile(r"(?<![\w./-])largefr(?:\.\w+)+")


def project_files() -> list[str]:
    """The project's Markdown, Python and shell files, relative to the repository root."""
    found = [name for name in os.listdir(ROOT) if name.endswith(".md")]
    for folder in SCANNED_FOLDERS:
        for directory, subdirs, files in os.walk(os.path.join(ROOT, folder)):
            subdirs[:] = [d for d in subdirs if not d.startswith((".", "__"))]
            found += [os.path.relpath(os.path.join(directory, f), ROOT) for f in files if f.endswith(SUFFIXES)]
    return sorted(found)


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _is_pattern(text: str, end: int) -> bool:
    while end < len(text) and text[end] in "./-":
        end += 1
    return end < len(text) and text[end] in PATTERN_MARKS


def missing_paths(text: str, root: str = ROOT) -> list[tuple[int, str]]:
    """(line, path) of every repository path in `text` that does not exist under `root`."""
    return [(_line(text, m.start()), m.group(0)) for m in PATH_PATTERN.finditer(text)
            if not _is_pattern(text, m.end()) and not os.path.exists(os.path.join(root, m.group(0)))]


@functools.lru_cache(maxsize=None)
def top_level_names(path: str) -> frozenset[str]:
    """Names a module defines or imports at its top level (also under a top-level `if`, e.g. TYPE_CHECKING)."""
    names: set[str] = set()
    body = ast.parse(open(path, encoding="utf-8").read()).body
    for node in body + [sub for node in body if isinstance(node, ast.If) for sub in node.body]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return frozenset(names)


def module_resolves(dotted: str, root: str = ROOT) -> bool:
    """Whether `largefr.<package>.<module>...` names a package, a module, or a top-level name of one."""
    parts = dotted.split(".")
    folder = os.path.join(root, parts[0])
    for index, name in enumerate(parts[1:], start=1):
        if name.startswith("__"):  # largefr.__file__, module dunders
            return True
        if os.path.isfile(os.path.join(folder, name, "__init__.py")):
            folder = os.path.join(folder, name)
            continue
        module = os.path.join(folder, f"{name}.py")
        if os.path.isfile(module):
            rest = parts[index + 1:]
            return not rest or rest[0].startswith("__") or rest[0] in top_level_names(module)
        return name in top_level_names(os.path.join(folder, "__init__.py"))
    return True


def unresolved_modules(text: str, root: str = ROOT) -> list[tuple[int, str]]:
    """(line, dotted name) of every `largefr.` reference in `text` that does not resolve."""
    return [(_line(text, m.start()), m.group(0)) for m in MODULE_PATTERN.finditer(text)
            if not module_resolves(m.group(0), root)]


def test_every_named_path_and_module_exists():
    problems = []
    for name in project_files():
        with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
            text = handle.read()
        problems += [f"{name}:{line}: {path} does not exist" for line, path in missing_paths(text)]
        problems += [f"{name}:{line}: {dotted} is not a largefr module or name" for line, dotted in
                     unresolved_modules(text)]
    assert not problems, "\n".join(problems)


def test_the_check_reports_stale_references_and_passes_patterns_and_live_ones():
    # The stale names are split in this file's source, so that the scan of this file does not find them.
    stale_path, stale_tool = "largefr" + "/train/checkpoint.py", "tools" + "/profile.py"
    stale_module, no_name = "largefr" + ".train.checkpoint.reseed_value", "largefr" + ".checkpoint.save_load.nothing"
    text = (f"see {stale_path} and `{stale_tool}`; moved to largefr/checkpoint/save_load.py\n"
            "arcface_torch's configs/wf42m_pfc03_*_vit.py, configs/wf42m-r50.*.py and tools/<name>.py are patterns; "
            "docs/DESIGN.md.\n"
            f"{stale_module}, largefr.stateful.reseed_value, {no_name}, largefr.heads.ShardedMarginHead, "
            "largefr.perf.\n")
    assert missing_paths(text) == [(1, stale_path), (1, stale_tool)]
    assert unresolved_modules(text) == [(3, stale_module), (3, no_name)]
    assert "tests/test_docs_paths.py" in project_files() and "README.md" in project_files()
