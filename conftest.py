"""Repository-wide pytest hooks.

Tests that need root and network namespaces carry `@pytest.mark.netns`. Outside root they skip
with a clear reason; as root every one of them must run, so each such skip is written to
build/netns-skips.txt and `.ci/run` fails when that file is not empty. Skips that blame missing
privileges or a missing package (which `make test` installs) are recorded the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SKIP_RECORD = Path(__file__).parent / "build" / "netns-skips.txt"
SETUP_WORDS = ("root", "cap_net_admin", "not installed")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped:
        return
    reason = str(report.longrepr).lower()
    blames_setup = any(word in reason for word in SETUP_WORDS)
    if "netns" not in report.keywords and not blames_setup:
        return
    if os.geteuid() != 0:
        return
    SKIP_RECORD.parent.mkdir(exist_ok=True)
    with SKIP_RECORD.open("a") as record:
        record.write(f"{report.nodeid}: {report.longrepr}\n")
