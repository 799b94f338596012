"""What the evaluation tools share: the errors that end a tool with a message, and JSON output."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

from largefr.data.recordio import RecordIOError
from largefr.data.verification_bin import VerificationBinError

# Problems of the user's input (files, arguments, missing extras): printed as one line, exit 2.
# Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError, VerificationBinError,
                                                RecordIOError)


def write_json(path: str, payload: Any) -> None:
    """Write `payload` as indented JSON, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
        handle.write("\n")
    os.replace(tmp, path)


def run_tool(name: str, body: Callable[[], int | None]) -> int:
    """Run a tool's body; a user error becomes `name: error: message` on stderr and exit status 2."""
    try:
        return body() or 0
    except USER_ERRORS as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2


def model_summary(loaded) -> dict[str, Any]:
    return {"source": loaded.source, "network": loaded.network, "embedding_size": loaded.embedding_size}
