"""common.engines.threads: the num_threads knob."""

from __future__ import annotations

import pytest
import torch

from common.engines.threads import set_num_threads


def test_num_threads_is_set_or_left_to_pytorch():
    before = torch.get_num_threads()
    try:
        assert set_num_threads(1) == 1 == torch.get_num_threads()
        assert set_num_threads(None) == 1  # None leaves the current setting alone
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="positive integer or None"):
        set_num_threads(bad)
