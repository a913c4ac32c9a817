"""Quantizer-state files are data: loading one never runs code from it."""

import os

import pytest
import torch

from dist_quant.calibrate.state import QuantStateError, restore_quant_state


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_state_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"world": 1, "state": _Payload(marker), "weights": {}}, tmp_path / "quant_state.rank00000.pt")
    with pytest.raises(QuantStateError, match=r"quant_state.rank00000.pt: not a quant-state file of dist_quant"):
        restore_quant_state(torch.nn.Linear(16, 16), tmp_path)
    assert not marker.exists()


def test_a_truncated_state_file_is_one_line(tmp_path):
    torch.save({"world": 1, "state": {}, "weights": {}}, tmp_path / "quant_state.rank00000.pt")
    path = tmp_path / "quant_state.rank00000.pt"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(QuantStateError) as error:
        restore_quant_state(torch.nn.Linear(16, 16), tmp_path)
    assert "\n" not in str(error.value)
