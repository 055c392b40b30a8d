"""Tests of the migration lab itself (serval/host/migration_lab.py), and its names re-exported
for the tests of tests/host/test_migration*.py, which import them from here."""

from __future__ import annotations

import array
import random
from pathlib import Path

import pytest

from serval.host.migration_lab import (
    REPOSITORY_ROOT,
    AppProcess,
    LabFlow,
    SalNode,
    SentPacket,
    assert_no_resets,
    digest_of,
    establish,
    lab_nodes,
    lab_service,
    random_bytes,
    receive_gaps,
    wait_for,
)
from serval.topology import Topology

__all__ = [
    "REPOSITORY_ROOT",
    "AppProcess",
    "LabFlow",
    "SalNode",
    "SentPacket",
    "assert_no_resets",
    "digest_of",
    "establish",
    "lab_nodes",
    "lab_service",
    "random_bytes",
    "receive_gaps",
    "wait_for",
]

@pytest.mark.netns
def test_lab_transfer_without_migration_is_intact(pair: Topology, tmp_path: Path) -> None:
    with lab_nodes(pair, "a", "b") as (node_a, node_b):
        lab = establish(node_a, node_b, 4, random.Random(1), 4 << 20, 1, str(tmp_path))
        try:
            lab.start()
            lab.finish()
        finally:
            lab.close()
        assert len(lab.client_app.recv_times) > 0
        assert node_a.counters()["completed_initiator"] == 0
    assert_no_resets(pair["a"], pair["b"])


@pytest.mark.netns
def test_lab_detects_a_corrupted_stream(pair: Topology, tmp_path: Path) -> None:
    """The checker itself: one wrong byte is a sha256 mismatch, not a pass."""
    with lab_nodes(pair, "a", "b") as (node_a, node_b):
        lab = establish(node_a, node_b, 4, random.Random(3), 1 << 20, 3, str(tmp_path))
        try:
            lab.client_app.expected_digest = "0" * 64
            lab.start()
            lab.server_app.finish()
            with pytest.raises(AssertionError, match="sha256 mismatch"):
                lab.client_app.finish()
        finally:
            lab.close()


def test_receive_gaps_find_the_gap_overlapping_each_window() -> None:
    times = array.array("d", [1.0, 1.001, 1.002, 1.050, 1.051, 2.0, 2.001])
    assert receive_gaps(times, [(1.01, 1.02)]) == [pytest.approx(48.0)]
    assert receive_gaps(times, [(1.0505, 1.0506)]) == [pytest.approx(1.0)]
    assert receive_gaps(times, [(1.5, 1.6)]) == [pytest.approx(949.0)]
