"""The systemd units pass `systemd-analyze verify` (with the drop-in) and keep their promises:
Type=notify, a watchdog, ExecReload, and only the capabilities needed."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"


def _parse(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    # Repeated keys (ExecReload, SystemCallFilter) are legal in units: keep the last one.
    parser.read_string(path.read_text())
    return parser


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart programs exist: point them at an executable that does.
    for source in UNITS.rglob("*"):
        target = tmp_path / source.relative_to(UNITS)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        text = source.read_text()
        for program in ("/usr/local/bin/serval-translator", "/usr/local/bin/servald"):
            text = text.replace(program, "/bin/true")
        target.write_text(text)
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:", "SYSTEMD_LOG_LEVEL": "notice"}
    result = subprocess.run(
        ["systemd-analyze", "verify", "serval-translator.service", "servald.service"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # Warnings (unknown keys, bad values in the drop-in too) are failures for us.
    assert result.stderr.strip() == "", result.stderr


def test_translator_unit_promises() -> None:
    text = (UNITS / "serval-translator.service").read_text()
    unit = _parse(UNITS / "serval-translator.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert int(service["WatchdogSec"]) > 0
    assert "kill -HUP $MAINPID" in text and "ExecReload=/usr/local/bin/serval-translator " \
        "check-config" in text
    assert service["CapabilityBoundingSet"].split() == ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"]
    assert service["AmbientCapabilities"].split() == ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"]
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["User"] != "root"
    # The supervisor stops servald itself after the drain: only it gets SIGTERM.
    assert service["KillMode"] == "mixed"


def test_external_servald_drop_in_removes_net_admin() -> None:
    text = (UNITS / "serval-translator.service.d" / "external-servald.conf").read_text()
    lines = [line for line in text.splitlines() if line.startswith("CapabilityBoundingSet=")]
    assert lines == ["CapabilityBoundingSet=", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"]
    servald = _parse(UNITS / "servald.service")["Service"]
    assert servald["CapabilityBoundingSet"].split() == ["CAP_NET_ADMIN"]
