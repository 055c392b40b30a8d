"""servald configuration: YAML validation with file/line/key errors, flags over the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serval.core.ids import ServiceID
from serval.errors import ConfigError
from serval.host.config import (
    DEFAULT_CONTROL_SOCKET,
    Overrides,
    config_from_args,
    load_config,
    parse_endpoint,
)
from serval.host.dataplane import conntrack_advice

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "servald.yaml"
    path.write_text(text)
    return str(path)


def test_example_config_loads() -> None:
    config = load_config(str(REPO / "config" / "servald.example.yaml"), environ={})
    assert config.port == 54325
    assert config.data_plane.mode == "repair"
    assert config.registration.lifetime_s <= 3.0  # the 3 s failover promise
    assert config.control_socket == DEFAULT_CONTROL_SOCKET


def test_full_config_and_prefix_modes(tmp_path: Path) -> None:
    path = write(tmp_path, """
router: false
port: 6000
routers: ["10.0.0.1", "10.0.0.2:7000", "[fd00::1]"]
domain_key: 00112233445566778899aabbccddeeff
data_plane:
  mode: repair
  prefixes:
    - service: "0x12/8"
      mode: handshake
    - service: "0x1234/16"
      mode: repair
rules:
  - service: web.example
    kind: forward
    address: 10.0.0.7
    weight: 3
""")
    config = load_config(path, environ={})
    assert [str(r) for r in config.routers] == ["10.0.0.1:6000", "10.0.0.2:7000",
                                                "[fd00::1]:6000"]
    assert config.domain_key == bytes.fromhex("00112233445566778899aabbccddeeff")
    assert config.data_plane.mode_for(ServiceID.parse("0x12ff")) == "handshake"
    assert config.data_plane.mode_for(ServiceID.parse("0x1234")) == "repair"
    assert config.data_plane.mode_for(ServiceID.parse("0x99")) == "repair"
    assert config.rules[0].weight == 3 and config.rules[0].kind == "forward"


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("port: 70000\n", 1, "port"),
        ("log_level: info\nportt: 5\n", 2, "portt"),
        ("data_plane:\n  mode: fast\n", 2, "data_plane.mode"),
        ("routers:\n  - 10.0.0.1\n  - not-an-address\n", 3, "routers[1]"),
        ("rules:\n  - service: web.example\n    kind: forward\n", 2, "rules[0]"),
        ("domain_key: abcd\n", 1, "domain_key"),
        ("registration:\n  refresh_s: 5\n  lifetime_s: 2\n", 3, "registration.lifetime_s"),
    ],
)
def test_invalid_values_name_file_line_and_key(tmp_path: Path, text: str, line: int,
                                               key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert f"{path}:{line}:" in message
    assert repr(key) in message


def test_invalid_yaml_names_the_position(tmp_path: Path) -> None:
    path = write(tmp_path, "port: 1\nrouters: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert f"{path}:" in str(info.value) and "invalid YAML" in str(info.value)


def test_flags_override_the_file_and_env(tmp_path: Path) -> None:
    path = write(tmp_path, "port: 6000\nrouters: [10.0.0.1]\nlog_level: debug\n")
    config = load_config(
        path,
        Overrides(router=True, router_addrs=("10.9.9.9", "10.9.9.8:1234"), port=7000,
                  control_socket="/tmp/x.sock", log_level="warning"),
        environ={"SERVAL_CONTROL_SOCKET": "/tmp/env.sock"},
    )
    assert config.router and config.port == 7000 and config.log_level == "warning"
    assert [str(r) for r in config.routers] == ["10.9.9.9:7000", "10.9.9.8:1234"]
    assert config.control_socket == "/tmp/x.sock"
    # Without the flag the environment wins over the default.
    assert load_config(None, environ={"SERVAL_CONTROL_SOCKET": "/tmp/env.sock"}) \
        .control_socket == "/tmp/env.sock"


def test_bad_flag_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="--port"):
        config_from_args(["--port", "0"])
    with pytest.raises(ConfigError, match="--router-addr"):
        config_from_args(["--router-addr", "nowhere"])
    with pytest.raises(ConfigError, match="--log-level"):
        config_from_args(["--log-level", "loud"])


def test_servald_exits_2_on_a_bad_config(tmp_path: Path) -> None:
    path = write(tmp_path, "data_plane:\n  handshake_port: -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "serval.host.daemon", "--config", path], cwd=REPO,
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{path}:2:" in result.stderr and "data_plane.handshake_port" in result.stderr


def test_parse_endpoint_forms() -> None:
    assert str(parse_endpoint("10.1.2.3", 5)) == "10.1.2.3:5"
    assert str(parse_endpoint("[fd00::2]:9", 5)) == "[fd00::2]:9"
    assert str(parse_endpoint("fd00::2", 5)) == "[fd00::2]:5"
    with pytest.raises(ValueError):
        parse_endpoint("10.1.2.3:0", 5)


def test_conntrack_advice(tmp_path: Path) -> None:
    assert conntrack_advice(tmp_path / "absent") == ({}, [])
    (tmp_path / "nf_conntrack_tcp_loose").write_text("0\n")
    settings, advice = conntrack_advice(tmp_path)
    assert settings == {"nf_conntrack_tcp_loose": "0"}
    assert any("nf_conntrack_tcp_loose=1" in line for line in advice)
