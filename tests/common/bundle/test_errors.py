"""common.bundle.errors: the root cause of a failure is the last line of the output."""

from __future__ import annotations

import subprocess
import sys

from common.bundle.errors import root_cause, summary_line


def _wrapped() -> RuntimeError:
    try:
        try:
            raise ValueError("No datalist at /d/datalist.json. Make it with make-brain-phantoms.")
        except ValueError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression: $@dataset") from inner
    except RuntimeError as outer:
        return outer


def test_root_cause_follows_the_chain_to_the_message_that_names_the_problem():
    error = _wrapped()
    assert isinstance(root_cause(error), ValueError)
    assert summary_line(error) == "error: No datalist at /d/datalist.json. Make it with make-brain-phantoms."
    assert summary_line(KeyError("unet")) == "error: KeyError: 'unet'"


def test_installed_hook_prints_the_traceback_then_the_cause_last():
    code = (
        "from common.bundle.errors import install_error_summary\n"
        "install_error_summary()\n"
        "try:\n    raise ValueError('the real problem: give --seed an integer')\n"
        "except ValueError as e:\n    raise RuntimeError('Failed to instantiate the evaluator') from e\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert "Traceback" in done.stderr and "Failed to instantiate" in done.stderr
    assert lines[-1] == "error: the real problem: give --seed an integer"
