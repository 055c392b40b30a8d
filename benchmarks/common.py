"""Shared benchmark utilities: medians, process CPU and memory, progress, JSON/Markdown/plot output.

Every benchmark in this directory measures side by side in one run and writes three files to
benchmarks/results/: `<name>.json` (all raw samples plus the summary), `<name>.md` (a Markdown
table a human reads) and `<name>.png` (a plot). Nothing here knows about a particular benchmark.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serval.topology import Host

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# /proc/<pid>/stat counts CPU time in clock ticks (USER_HZ, 100 on every Linux we run on).
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_SIZE_BYTES = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------
# Statistics


def median(values: Iterable[float]) -> float:
    """Median of the values; NaN for an empty sequence (a relay that failed every round)."""
    collected = [value for value in values if value == value]  # drop NaN samples
    if not collected:
        return float("nan")
    return float(statistics.median(collected))


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when either is missing or the denominator is zero."""
    if denominator == 0 or numerator != numerator or denominator != denominator:
        return float("nan")
    return numerator / denominator


def json_number(value: float) -> float | None:
    """JSON has no NaN: a missing measurement becomes null."""
    return None if value != value else value


# ---------------------------------------------------------------------------------------------
# Process CPU time and memory, read from /proc (no psutil needed, and it works across
# namespaces because PIDs are global from the root PID namespace we run in).


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat_file:
        text = stat_file.read()
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    return text[text.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    """Direct children of `pid` across all its threads."""
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return children
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as children_file:
                children.extend(int(child) for child in children_file.read().split())
        except FileNotFoundError:
            continue
    return children


def _task_runtime_s(pid: int) -> float:
    """On-CPU seconds of every live thread of a process, from /proc/<pid>/task/*/schedstat.

    The first schedstat field is the scheduler's sum_exec_runtime in nanoseconds: the same total
    that utime+stime are scaled to, but without their 1/USER_HZ (10 ms) rounding per field,
    which at 1 Gbit/s is ~3% of a 6 s run's relay CPU.
    """
    total_ns = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as schedstat:
                total_ns += int(schedstat.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return total_ns / 1e9


def process_tree_cpu_s(pid: int, *, schedstat: bool = False) -> float:
    """User+system CPU seconds of a process, all its threads and all its descendants.

    Reaped children are included through cutime/cstime (socat forks one child per connection and
    reaps it when it exits); children still alive are walked and added. A process that has
    already gone counts as zero, so take the sample while the relay is still running.

    `schedstat`: count live threads with nanosecond resolution (_task_runtime_s) instead of
    utime+stime. Threads that exited are then lost, so use it only for processes that keep their
    threads over the measured interval (relays: HAProxy, the engine's workers).
    """
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # After the ")" the fields start at field 3 (state): utime is field 14, stime 15,
    # cutime 16, cstime 17 (proc(5)), i.e. indexes 11..14 here.
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    own_s = _task_runtime_s(pid) if schedstat else (utime + stime) / CLOCK_TICKS_PER_S
    total_s = own_s + (cutime + cstime) / CLOCK_TICKS_PER_S
    for child in _children(pid):
        total_s += process_tree_cpu_s(child, schedstat=schedstat)
    return total_s


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (its threads share it), from /proc/<pid>/statm."""
    with open(f"/proc/{pid}/statm", encoding="ascii") as statm_file:
        resident_pages = int(statm_file.read().split()[1])
    return resident_pages * PAGE_SIZE_BYTES


def fd_count(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------------------------------------
# Processes and tools in the namespaces

LISTEN_POLL_S = 0.05
VERSION_NUMBER = re.compile(r"\d+\.\d+")


def wait_listening(host: Host, port: int, timeout_s: float) -> None:
    """Poll `ss` in the host's namespace until something listens on the TCP port (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if host.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip():
            return
        time.sleep(LISTEN_POLL_S)
    raise TimeoutError(f"nothing listens on port {port} in {host.netns} after {timeout_s:g} s")


@dataclass
class IperfResult:
    """What one `iperf3 -J` client run reported: goodput as received by the server."""

    gbit_s: float = float("nan")
    bytes: int = 0
    retransmits: int | None = None
    error: str | None = None


def parse_iperf3(result: subprocess.CompletedProcess[str]) -> IperfResult:
    """The receiver-side totals of an `iperf3 -J` client run, or why there are none."""
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        report = {"error": (result.stdout + result.stderr).strip()[-500:] or "no output"}
    if "error" in report or result.returncode != 0:
        return IperfResult(error=str(report.get("error", f"iperf3 exit {result.returncode}")))
    received = report["end"]["sum_received"]
    return IperfResult(
        gbit_s=received["bits_per_second"] / 1e9,
        bytes=int(received["bytes"]),
        retransmits=report["end"].get("sum_sent", {}).get("retransmits"),
    )


def tool_versions(tools: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """name -> version line of each tool (argv prints it); tools that cannot run are left out."""
    versions: dict[str, str] = {}
    for name, argv in tools.items():
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        lines = (done.stdout + done.stderr).strip().splitlines()
        if lines:
            # The first line with a version number: socat starts with a banner line, wrk
            # follows its version line with usage text that also says "version".
            numbered = [line for line in lines if VERSION_NUMBER.search(line)]
            versions[name] = (numbered[0] if numbered else lines[0]).strip()
    return versions


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """One line per step on stderr: `[  3/24  0:42 elapsed, ~2:10 left] message`.

    The estimate of the time left assumes the remaining steps take as long as the finished ones
    did on average; it is only there so that whoever runs a long benchmark knows it is alive.
    """

    def __init__(self, total_steps: int, *, stream: Any = None) -> None:
        self.total_steps = max(1, total_steps)
        self.done_steps = 0
        self.started = time.monotonic()
        self.stream = stream if stream is not None else sys.stderr

    def step(self, message: str) -> None:
        """Announce the next step (counted as done when the following step starts)."""
        elapsed_s = time.monotonic() - self.started
        if self.done_steps:
            left_s = elapsed_s / self.done_steps * (self.total_steps - self.done_steps)
            eta = f", ~{_clock(left_s)} left"
        else:
            eta = ""
        width = len(str(self.total_steps))
        self.done_steps += 1
        print(
            f"[{self.done_steps:>{width}}/{self.total_steps} {_clock(elapsed_s)} elapsed{eta}] "
            f"{message}",
            file=self.stream,
            flush=True,
        )

    def note(self, message: str) -> None:
        """A line that is not a step (a result, a warning)."""
        print(f"    {message}", file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


# ---------------------------------------------------------------------------------------------
# Output

# matplotlib's default "tab10" cycle, fixed here so a series keeps its colour across panels.
SERIES_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` as indented JSON, atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    temporary.replace(path)


def clean_for_json(value: Any) -> Any:
    """A copy with every NaN as null (JSON has no NaN) and every mapping key a string."""
    if isinstance(value, float):
        return json_number(value)
    if isinstance(value, dict):
        return {str(key): clean_for_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [clean_for_json(item) for item in value]
    return value


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table; numeric-looking columns are right-aligned."""

    def numeric(text: str) -> bool:
        stripped = text.strip().rstrip("%x").replace(".", "", 1).replace("-", "", 1)
        return stripped.isdigit()

    alignments = []
    for column in range(len(headers)):
        cells = [row[column] for row in rows if column < len(row) and row[column] not in ("", "–")]
        alignments.append("---:" if cells and all(numeric(cell) for cell in cells) else "---")
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(alignments) + "|",
    ]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines) + "\n"


def format_number(value: float, digits: int = 2, suffix: str = "") -> str:
    """Fixed-point text for a table cell; an en dash for a missing value."""
    if value != value:
        return "–"
    return f"{value:.{digits}f}{suffix}"


@dataclass(frozen=True)
class BarPanel:
    """One panel of a grouped bar chart: `values[series][group]`, NaN for a missing bar."""

    title: str
    y_label: str
    groups: Sequence[str]
    series: Sequence[str]
    values: Mapping[str, Sequence[float]]
    # Optional per-series sample spread drawn as error bars: (low, high) per group.
    spread: Mapping[str, Sequence[tuple[float, float]]] | None = None
    # Optional fixed colour per series, so one contender has one colour in every panel.
    colors: Mapping[str, str] | None = None
    # Optional y-axis range; None lets matplotlib choose (from zero for bars).
    y_limits: tuple[float, float] | None = None


def plot_bar_panels(path: Path, panels: Sequence[BarPanel], *, title: str) -> bool:
    """Draw the panels side by side into a PNG. Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display in a namespace or CI
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return False

    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        series_count = max(1, len(panel.series))
        bar_width = 0.8 / series_count
        for index, series_name in enumerate(panel.series):
            offsets = [
                group + (index - (series_count - 1) / 2) * bar_width
                for group in range(len(panel.groups))
            ]
            heights = [0.0 if value != value else value for value in panel.values[series_name]]
            error: list[list[float]] | None = None
            if panel.spread is not None and series_name in panel.spread:
                lows = []
                highs = []
                for height, (low, high) in zip(heights, panel.spread[series_name], strict=True):
                    lows.append(max(0.0, height - low) if low == low else 0.0)
                    highs.append(max(0.0, high - height) if high == high else 0.0)
                error = [lows, highs]
            color = panel.colors.get(series_name) if panel.colors is not None else None
            axis.bar(offsets, heights, bar_width, label=series_name, yerr=error, capsize=2,
                     color=color)
        axis.set_xticks(range(len(panel.groups)))
        axis.set_xticklabels(panel.groups)
        axis.set_ylabel(panel.y_label)
        axis.set_title(panel.title)
        axis.grid(axis="y", alpha=0.3)
        if panel.y_limits is not None:
            axis.set_ylim(*panel.y_limits)
    axes[0][0].legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
