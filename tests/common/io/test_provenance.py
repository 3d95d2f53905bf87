"""common.io.provenance: the weight files an output names, with their hashes and demo flag."""

from __future__ import annotations

import pytest
import torch

from common.io.provenance import weights_provenance
from common.io.weights import sha256sum


def test_weight_files_are_hashed_and_unused_optional_ones_left_out(tmp_path):
    demo, plain = tmp_path / "demo.pt", tmp_path / "plain.pt"
    torch.save({"net": {"w": torch.ones(2)}, "provenance": {"demo": True}}, demo)
    torch.save({"net": {"w": torch.zeros(2)}}, plain)
    record = weights_provenance({"decoder": demo, "prior": str(plain), "lora": None})
    assert set(record) == {"decoder", "prior"}, "no LoRA adapter in this run: not claimed"
    assert record["decoder"] == {"file": "demo.pt", "sha256": sha256sum(demo), "demo": True}
    assert record["prior"]["demo"] is False
    with pytest.raises(FileNotFoundError):
        weights_provenance({"decoder": tmp_path / "missing.pt"})
