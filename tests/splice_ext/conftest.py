"""Fixtures for the relay engine tests (real kernel sockets over loopback, no mocks)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from splice_ext import Relay


@pytest.fixture
def relay() -> Iterator[Relay]:
    engine = Relay(workers=2)
    try:
        yield engine
    finally:
        engine.stop()
