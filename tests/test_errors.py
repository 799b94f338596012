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
