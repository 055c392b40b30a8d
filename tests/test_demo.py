"""`make demo` at this stage: the in-memory trace must run and show the weighted spread."""

from __future__ import annotations

import pytest

from serval import demo


def test_demo_connects_everything_and_spreads_by_weight(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--connections", "200"]) == 0
    out = capsys.readouterr().out
    assert "200/200 connected" in out
    assert "saw 0 other packets" in out  # the router only ever handles SYNs
    assert "RSYN|ACK" in out and "authenticated" in out
