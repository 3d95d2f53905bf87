"""The cause of a failed bundle run, as the last line of its output.

MONAI wraps every failure of a config expression or component in ``RuntimeError("Failed to evaluate ...")`` /
``"Failed to instantiate ..."``, so a 50 to 120 line traceback ends with a generic line while the message that
names the problem and its fix sits in the middle. Under ``python -m monai.bundle run`` the bundles install
:func:`install_error_summary` (from :func:`common.bundle.options.check_command_line`): the traceback is still
printed in full, then the root cause is repeated at the very end.
"""

from __future__ import annotations

import sys
import traceback
from types import TracebackType


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of ``error``'s chain (``raise ... from``, or raised while handling another)."""
    seen = {id(error)}
    while True:
        nxt = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if nxt is None or id(nxt) in seen:
            return error
        seen.add(id(nxt))
        error = nxt


def summary_line(error: BaseException) -> str:
    """``"error: <root cause>"``, with the exception type where its message alone would not say what happened."""
    cause = root_cause(error)
    text = str(cause).strip() or type(cause).__name__
    if isinstance(cause, (KeyError, IndexError, AttributeError, TypeError, ModuleNotFoundError)):
        text = f"{type(cause).__name__}: {text}"
    return f"error: {text}"


def _excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    traceback.print_exception(kind, error, tb)
    if not isinstance(error, KeyboardInterrupt):
        print(f"\n{summary_line(error)}", file=sys.stderr)


def install_error_summary() -> None:
    """Make an uncaught exception end the output with its root cause (idempotent)."""
    sys.excepthook = _excepthook
