"""Third-party lines that tell the user nothing, filtered unless LARGEFR_VERBOSE=1 (launch/train.py --verbose).

* DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
  it." warning, printed by every process that imports deepspeed on a machine without a GPU: the run's
  banner names the device instead.
* DeepSpeed's "... deepspeed_shm_comm_op built successfully" line, one per rank at every start
  (`quiet_stdout` around `deepspeed.init_distributed`; a failure prints what was held back).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator

VERBOSE_VARIABLE = "LARGEFR_VERBOSE"
DEEPSPEED_LOGGER = "DeepSpeed"
_FILTERED_WARNINGS = ("Setting accelerator to CPU",)


def verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0")


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_FILTERED_WARNINGS)


def quiet_third_party() -> None:
    """Install the filters (once; before deepspeed is imported, whose logger object is this same one)."""
    if verbose():
        return
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
        logger.addFilter(_DropKnownNoise())


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Hold back what third-party code prints to stdout; printed after all if the block raises (or verbose)."""
    if verbose():
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    except BaseException:
        sys.stdout.write(held.getvalue())
        raise
