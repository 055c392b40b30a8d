"""translator.config: valid files parse to the right objects; every invalid one is rejected with
FILE:LINE:COLUMN, the key path and what was expected."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from serval.core.ids import ServiceID
from serval.errors import ConfigError
from translator.cli import main
from translator.config import (
    DEFAULT_BUNDLED_CONTROL_SOCKET,
    DEFAULT_EXTERNAL_CONTROL_SOCKET,
    Endpoint,
    TranslatorConfig,
    load_config,
    parse_config,
    parse_endpoint,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "translator.example.yaml"

MINIMAL = """\
listeners:
  - name: web
    port: 8080
    service: web.example
"""


def parse(text: str) -> TranslatorConfig:
    return parse_config(textwrap.dedent(text), "t.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value).splitlines()


def only_problem(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------------------------
# valid configurations


def test_example_config_is_valid_and_complete() -> None:
    config = load_config(EXAMPLE)
    assert [listener.name for listener in config.listeners] == ["web", "cache"]
    web = config.listeners[0]
    assert web.address == ipaddress.ip_address("::") and web.port == 80
    assert web.service == ServiceID.parse("web.example")
    assert (web.max_connections, web.backlog, web.connect_timeout_s, web.idle_timeout_s) == (
        10000, 4096, 5.0, 300.0)
    assert config.listeners[1].idle_timeout_s is None
    exporter = config.exporters[0]
    assert exporter.target == Endpoint("127.0.0.1", 8080)
    assert exporter.proxy_protocol == "v2"
    assert config.stack.mode == "bundled"
    assert config.stack.servald is not None
    assert [str(r.address) for r in config.stack.servald.routers] == ["10.0.0.1"]
    # servald gets the translator's control socket, not its own default.
    assert config.stack.servald.control_socket == config.stack.control_socket
    assert config.metrics.address == Endpoint("127.0.0.1", 9464)
    assert config.relay.pipe_size == 1 << 20
    assert config.drain.timeout_s == 30.0


def test_example_documents_every_key_on_its_line() -> None:
    # "Documented line by line": every line that sets a key carries a comment: on the line
    # itself, on the line just above (section headers) or just below (long values).
    lines = EXAMPLE.read_text().splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not re.match(r"^(- )?[a-z_]+:", stripped):
            continue
        above = lines[index - 1].strip() if index > 0 else ""
        below = lines[index + 1].strip() if index + 1 < len(lines) else ""
        assert "#" in line or above.startswith("#") or below.startswith("#"), \
            f"line {index + 1} is not documented: {line!r}"


def test_minimal_config_defaults() -> None:
    config = parse(MINIMAL)
    listener = config.listeners[0]
    assert listener.address == ipaddress.ip_address("::")
    assert listener.forward_client_address is True
    assert listener.position is not None and (listener.position.line,
                                              listener.position.column) == (2, 5)
    assert config.stack.mode == "external"
    assert config.stack.control_socket == DEFAULT_EXTERNAL_CONTROL_SOCKET
    assert config.exporters == ()


def test_bundled_by_presence_of_servald_section() -> None:
    config = parse(MINIMAL + "stack:\n  servald:\n    port: 54400\n")
    assert config.stack.mode == "bundled"
    assert config.stack.control_socket == DEFAULT_BUNDLED_CONTROL_SOCKET
    assert config.stack.servald is not None and config.stack.servald.port == 54400


def test_servald_section_is_cut_out_with_positions_preserved() -> None:
    text = MINIMAL + textwrap.dedent("""\
        stack:
          mode: bundled
          servald:
            port: 54400     # a comment
            routers: [10.0.0.1]
        metrics:
          address: null
        """)
    config = parse(text)
    servald_text = config.stack.servald_yaml
    # Same line numbers and columns as in the translator's file, nothing else kept.
    original = text.splitlines()
    cut = servald_text.splitlines()
    assert cut[7] == original[7] and cut[8] == original[8]
    assert all(not line.strip() for line in cut[:7])
    assert yaml.safe_load(servald_text) == {"port": 54400, "routers": ["10.0.0.1"]}
    # JSON logs are appended for systemd unless the section chose a format.
    with_json = yaml.safe_load(config.stack.servald_file_text(json_logs=True))
    assert with_json["log_format"] == "json"
    assert yaml.safe_load(config.stack.servald_file_text(json_logs=False)).get(
        "log_format") is None


def test_service_written_as_unquoted_hex_keeps_its_text() -> None:
    # YAML reads 0x1f9 as the integer 505; as a serviceID it is left-aligned hex.
    config = parse("listeners:\n  - {name: a, port: 1, service: 0x1f9}\n")
    assert config.listeners[0].service == ServiceID.parse("0x1f9")
    assert config.listeners[0].service != ServiceID.parse("505")


def test_dual_stack_and_ipv4_on_same_port_conflict_but_ipv6_only_does_not() -> None:
    base = """\
        listeners:
          - {name: a, address: "::", port: 80, service: s.example%s}
          - {name: b, address: 192.0.2.1, port: 80, service: s.example}
        """
    message = only_problem(base % "")
    assert message.startswith("t.yaml:3:5: listeners[1]: 192.0.2.1:80 overlaps listeners[0]")
    config = parse(base % ", ipv6_only: true")
    assert len(config.listeners) == 2


def test_parse_endpoint() -> None:
    assert parse_endpoint("127.0.0.1:80") == Endpoint("127.0.0.1", 80)
    assert parse_endpoint("[::1]:8080") == Endpoint("::1", 8080)
    assert parse_endpoint("localhost:6379") == Endpoint("localhost", 6379)
    for bad in ("127.0.0.1", "::1:80", "[::1]", "host:0", "host:70000", "[nothex]:1", ":80"):
        assert parse_endpoint(bad) is None, bad


# --------------------------------------------------------------------------------------------
# invalid configurations: one message each, with position and expectation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL.replace("8080", "http"),
         "t.yaml:3:11: listeners[0].port: expected an integer 1..65535, got 'http' (a string)"),
        (MINIMAL.replace("8080", "70000"),
         "t.yaml:3:11: listeners[0].port: expected an integer 1..65535, got '70000' "
         "(an integer)"),
        (MINIMAL + "    address: 10.0.0.300\n",
         "t.yaml:5:14: listeners[0].address: expected an IPv4 or IPv6 address"),
        (MINIMAL.replace("web.example", '"0xzz"'),
         "t.yaml:4:14: listeners[0].service: not a serviceID"),
        (MINIMAL.replace("web.example", '"web.example/16"'),
         "t.yaml:4:14: listeners[0].service: expected a full serviceID, got the prefix"),
        (MINIMAL + "    max_conections: 5\n",
         "t.yaml:5:5: listeners[0].max_conections: unknown key (did you mean "
         "'max_connections'?)"),
        (MINIMAL + "    backlog: 0\n",
         "t.yaml:5:14: listeners[0].backlog: expected an integer 1..65535, got '0'"),
        (MINIMAL + "    connect_timeout_s: 0\n",
         "t.yaml:5:24: listeners[0].connect_timeout_s: expected a number of seconds, more "
         "than 0..3600"),
        (MINIMAL + "    idle_timeout_s: -1\n",
         "t.yaml:5:21: listeners[0].idle_timeout_s: expected a number of seconds, 0..86400, "
         "got '-1' (an integer) (0 or null: no timeout)"),
        (MINIMAL + "    mode: tcp\n",
         "t.yaml:5:11: listeners[0].mode: expected one of repair, handshake, got 'tcp'"),
        (MINIMAL + "    forward_client_address: maybe\n",
         "t.yaml:5:29: listeners[0].forward_client_address: expected true or false"),
        (MINIMAL + "    address: 10.0.0.1\n    ipv6_only: true\n",
         "t.yaml:6:16: listeners[0].ipv6_only: only applies to IPv6 addresses"),
        ("listeners:\n  - name: web\n    port: 80\n",
         "t.yaml:2:5: listeners[0]: missing required key 'service'"),
        ("listeners:\n  - name: 'bad name'\n    port: 80\n    service: s\n",
         "t.yaml:2:11: listeners[0].name: expected a name of letters, digits"),
        ("listeners: {name: web}\n",
         "t.yaml:1:12: listeners: expected a list of listeners, got a mapping"),
        (MINIMAL + "exporters:\n  - name: o\n    service: s\n    target: localhost\n",
         "t.yaml:8:13: exporters[0].target: expected the legacy server's address as "
         "HOST:PORT"),
        (MINIMAL + "exporters:\n  - {name: o, service: s, target: 'h:1', proxy_protocol: v1}\n",
         "t.yaml:6:58: exporters[0].proxy_protocol: expected one of none, v2, got 'v1'"),
        (MINIMAL + "exporters:\n  - {name: o, service: s, target: 'h:1', weight: 0}\n",
         "t.yaml:6:50: exporters[0].weight: expected an integer 1..65535, got '0'"),
        (MINIMAL + "relay:\n  workers: 2\n  workers: 3\n",
         "t.yaml:7:3: relay.workers: duplicate key (first given at line 6)"),
        (MINIMAL + "relay:\n  pipe_size: 100\n",
         "t.yaml:6:14: relay.pipe_size: expected an integer 4096..1073741824"),
        (MINIMAL + "logging:\n  level: verbose\n",
         "t.yaml:6:10: logging.level: expected one of debug, info, warning, error, critical"),
        (MINIMAL + "metrics:\n  address: 9464\n",
         "t.yaml:6:12: metrics.address: expected the Prometheus endpoint (or null to disable "
         "it) as HOST:PORT"),
        (MINIMAL + "status:\n  mode: 660\n",
         "t.yaml:6:9: status.mode: expected an octal file mode in quotes"),
        (MINIMAL + "status:\n  socket: relative.sock\n",
         "t.yaml:6:11: status.socket: expected an absolute path"),
        (MINIMAL + "drain:\n  timeout: 3\n",
         "t.yaml:6:3: drain.timeout: unknown key (did you mean 'timeout_s'?)"),
        (MINIMAL + "stack:\n  mode: external\n  servald: {port: 1}\n",
         "t.yaml:7:3: stack.servald: only applies with stack.mode: bundled"),
        (MINIMAL + "stack:\n  servald:\n    port: 99999\n",
         "t.yaml:7:11: stack.servald.port: must be an integer 1..65535, got 99999"),
        (MINIMAL + "stack:\n  servald:\n    control_socket: /x.sock\n",
         "t.yaml:7:5: stack.servald.control_socket: set stack.control_socket instead"),
        (MINIMAL + "stack:\n  servald:\n    routers: [not-an-address]\n",
         "t.yaml:7:15: stack.servald.routers[0]"),
        (MINIMAL + "stack:\n  restart: {max_restarts: 3}\n",
         "t.yaml:6:3: stack.restart: only applies with stack.mode: bundled"),
        (MINIMAL + "stack:\n  mode: bundled\n  restart: {backoff_initial_s: 5, "
                   "backoff_max_s: 1}\n",
         "t.yaml:7:50: stack.restart.backoff_max_s: must be at least backoff_initial_s (5)"),
        (MINIMAL + "stack:\n  mode: bundled\n  command: []\n",
         "t.yaml:7:12: stack.command: expected a non-empty list"),
        (MINIMAL + "extra: 1\n",
         "t.yaml:5:1: extra: unknown key; allowed here: listeners, exporters, stack"),
    ],
)
def test_invalid_value_is_reported_with_position(text: str, expected: str) -> None:
    message = only_problem(text)
    assert message.startswith(expected), message


def test_all_problems_are_reported_in_file_order() -> None:
    found = problems("""\
        listeners:
          - name: a
            port: 1
            service: s
          - name: a
            port: 2
            service: s
          - name: c
            port: x
            service: s
        relay:
          workers: 999
        """)
    assert [line.split(": ")[0] for line in found] == ["t.yaml:5:11", "t.yaml:9:11",
                                                       "t.yaml:12:12"]
    assert "duplicate listener name 'a' (also listeners[0])" in found[0]


def test_duplicate_exporter_service_is_rejected() -> None:
    message = only_problem(MINIMAL + """\
exporters:
  - {name: o1, service: web.example, target: "h:1"}
  - {name: o2, service: web.example, target: "h:2"}
""")
    assert message.startswith("t.yaml:7:25: exporters[1].service: service 'web.example' is "
                              "already exported by exporters[0]")


def test_yaml_syntax_error_has_position() -> None:
    with pytest.raises(ConfigError) as info:
        parse("listeners:\n  - name: [unclosed\n")
    assert re.match(r"t\.yaml:\d+:\d+: invalid YAML: ", str(info.value)), str(info.value)


def test_empty_and_do_nothing_configs_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"t\.yaml:1:1: the configuration is empty"):
        parse("")
    with pytest.raises(ConfigError, match="nothing to do: configure at least one listener"):
        parse("logging: {level: info}\n")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read the configuration"):
        load_config(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------------------------
# check-config


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL)
    assert main(["check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "configuration OK" in out and "listener web: tcp [::]:8080 -> service web.example" \
        in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("8080", "http") + "relay: {workers: -1}\n")
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:3:11: listeners[0].port: expected an integer 1..65535" in err
    assert f"{bad}:5:18: relay.workers: expected an integer 0..255" in err
    assert "2 problems found" in err


def test_check_config_as_a_program(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners:\n  - {name: w, port: 80}\n")
    result = subprocess.run([sys.executable, "-m", "translator", "check-config", str(bad)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"{bad}:2:5: listeners[0]: missing required key 'service'" in result.stderr
