"""One base for every error a user can cause (largefr.errors.UserError): caught once by the entry point and the tools."""
import ast
from pathlib import Path

from largefr.data.recordio import BadImageError, RecordIOError
from largefr.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN_BASES = {"Exception", "ValueError", "RuntimeError", "OSError", "FileExistsError", "TypeError", "KeyError"}


def declared_exception_classes() -> dict[str, list[str]]:
    """Every class of largefr/ that derives from a built-in exception or another such class: name -> base names."""
    classes: dict[str, tuple[str, list[str]]] = {}
    for path in sorted((ROOT / "largefr").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                classes[node.name] = (str(path.relative_to(ROOT)), bases)
    errors, changed = {}, True
    while changed:  # classes deriving from exceptions, transitively
        changed = False
        for name, (where, bases) in classes.items():
            if name not in errors and any(b in BUILT_IN_BASES or b in errors or b == "UserError" for b in bases):
                errors[name] = [where, *bases]
                changed = True
    errors.pop("UserError", None)
    return errors


def test_every_error_the_package_declares_is_a_user_error():
    errors = declared_exception_classes()
    assert len(errors) >= 20 and "ConfigError" in errors and "StorageError" in errors
    def derives(name: str) -> bool:
        return "UserError" in errors[name][1:] or any(b in errors and derives(b) for b in errors[name][1:])
    outside = [f"{errors[name][0]}: class {name}({', '.join(errors[name][1:])})" for name in errors if not derives(name)]
    assert outside == [], "declare them as UserError subclasses (largefr/errors.py), or keep a programming error out"


def test_user_errors_keep_their_built_in_base():
    assert issubclass(BadImageError, RecordIOError) and issubclass(BadImageError, UserError)
    from largefr.config_validation import ConfigError
    from largefr.checkpoint.storage import StorageError
    assert issubclass(ConfigError, ValueError) and issubclass(StorageError, OSError)


def test_a_tool_reports_a_users_error_on_one_line_and_lets_a_bug_raise(capsys, monkeypatch):
    import pytest

    from largefr.cli import run_tool
    from largefr.errors import UsageError

    monkeypatch.delenv("LARGEFR_DEBUG", raising=False)

    def bad_flag():
        raise UsageError("--world must be >= 1, got 0")

    assert run_tool("reshard_checkpoint", bad_flag) == 2
    assert capsys.readouterr().err == "reshard_checkpoint: error: --world must be >= 1, got 0\n"
    assert run_tool("rec", lambda: open("/nonexistent/train.rec"), error_status=1) == 1
    assert "rec: error: [Errno 2] No such file or directory: '/nonexistent/train.rec'" in capsys.readouterr().err

    def bug():
        raise ValueError("a programming error")

    with pytest.raises(ValueError, match="a programming error"):  # keeps its traceback
        run_tool("embed", bug)
    monkeypatch.setenv("LARGEFR_DEBUG", "1")
    with pytest.raises(UsageError):
        run_tool("reshard_checkpoint", bad_flag)
