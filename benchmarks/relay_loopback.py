"""Quick loopback sanity check: the splice_ext engine against a plain asyncio copy relay.

    .venv/bin/python benchmarks/relay_loopback.py [--gib 4] [--streams 1] [--json out.json]

The relay runs in this process; the traffic source and sink run in a child process, so the
CPU time measured here (getrusage, all threads) is the relay's alone. Loopback numbers are only a
sanity check (notes/splice-relays.md §5): the real comparison with HAProxy runs across network
namespaces in another benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from splice_ext import Relay

COPY_BUFFER_BYTES = 256 * 1024
GIB = 1 << 30

# Source and sink: connects `streams` (a, b) pairs to the relay's listener, in order; when told
# to, sends `total` bytes spread over the a sockets (then half-closes them) and reads every b
# socket to EOF; prints the wall time between the first byte sent and the last byte received.
TRAFFIC_PROCESS = r"""
import socket, sys, threading, time
port, streams, total = map(int, sys.argv[1:4])
pairs = []
for _ in range(streams):
    a = socket.create_connection(("127.0.0.1", port))
    b = socket.create_connection(("127.0.0.1", port))
    pairs.append((a, b))
print("connected", flush=True)
sys.stdin.readline()
chunk = b"\x5a" * (1 << 20)
share = total // streams
received = [0] * streams
def send(sock, size):
    view = memoryview(chunk)
    while size:
        step = min(size, len(chunk))
        sock.sendall(view[:step])
        size -= step
    sock.shutdown(socket.SHUT_WR)
def receive(index, sock):
    buf = bytearray(1 << 20)
    while n := sock.recv_into(buf):
        received[index] += n
threads = [threading.Thread(target=send, args=(a, share)) for a, _ in pairs]
threads += [threading.Thread(target=receive, args=(i, b)) for i, (_, b) in enumerate(pairs)]
started = time.perf_counter()
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.perf_counter() - started
print(f"{elapsed} {sum(received)}", flush=True)
"""


@dataclass
class Result:
    relay: str
    streams: int
    bytes: int
    seconds: float
    gbit_per_s: float
    relay_cpu_s: float
    relay_cpu_s_per_gb: float
    calls_per_gib: float | None = None


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_traffic(
    streams: int, total: int
) -> tuple[subprocess.Popen[str], list[tuple[socket.socket, socket.socket]]]:
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as listener:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                TRAFFIC_PROCESS,
                str(listener.getsockname()[1]),
                str(streams),
                str(total),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        accepted = [(listener.accept()[0], listener.accept()[0]) for _ in range(streams)]
    assert child.stdout is not None and child.stdout.readline().strip() == "connected"
    return child, accepted


def run_traffic(child: subprocess.Popen[str]) -> tuple[float, int]:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("\n")
    child.stdin.flush()
    elapsed, received = child.stdout.readline().split()
    child.wait()
    return float(elapsed), int(received)


def result(name: str, streams: int, moved: int, seconds: float, cpu: float) -> Result:
    return Result(
        relay=name,
        streams=streams,
        bytes=moved,
        seconds=seconds,
        gbit_per_s=moved * 8 / seconds / 1e9,
        relay_cpu_s=cpu,
        relay_cpu_s_per_gb=cpu / (moved / 1e9),
    )


def bench_engine(streams: int, total: int, workers: int, pipe_size: int) -> Result:
    child, pairs = start_traffic(streams, total)
    with Relay(workers=workers, pipe_size=pipe_size) as relay:
        for a, b in pairs:
            relay.add_pair(a.detach(), b.detach())
        cpu_before = cpu_seconds()
        seconds, moved = run_traffic(child)
        cpu = cpu_seconds() - cpu_before
        calls = sum(stats.splice_calls for stats in relay.worker_stats())
    measured = result(f"splice_ext (pipe {pipe_size >> 10} KiB)", streams, moved, seconds, cpu)
    measured.calls_per_gib = calls / (moved / GIB)
    return measured


async def copy_one_way(source: socket.socket, destination: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    buffer = bytearray(COPY_BUFFER_BYTES)
    view = memoryview(buffer)
    while size := await loop.sock_recv_into(source, buffer):
        await loop.sock_sendall(destination, view[:size])
    destination.shutdown(socket.SHUT_WR)


async def asyncio_relay(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    for a, b in pairs:
        a.setblocking(False)
        b.setblocking(False)
    await asyncio.gather(
        *(copy_one_way(a, b) for a, b in pairs), *(copy_one_way(b, a) for a, b in pairs)
    )


def bench_asyncio(streams: int, total: int) -> Result:
    child, pairs = start_traffic(streams, total)
    relay_thread = threading.Thread(target=asyncio.run, args=(asyncio_relay(pairs),))
    cpu_before = cpu_seconds()
    relay_thread.start()
    seconds, moved = run_traffic(child)
    relay_thread.join()
    cpu = cpu_seconds() - cpu_before
    for a, b in pairs:
        a.close()
        b.close()
    return result("asyncio recv_into/sendall 256 KiB", streams, moved, seconds, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0, help="data per run (default 4 GiB)")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="engine worker threads")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    total = int(args.gib * GIB)

    results: list[Result] = []
    for _ in range(args.repeat):
        results.append(bench_engine(args.streams, total, args.workers, 1 << 20))
        results.append(bench_engine(args.streams, total, args.workers, 64 * 1024))
        results.append(bench_asyncio(args.streams, total))

    print(f"loopback, {args.streams} stream(s), {args.gib:g} GiB per run, {os.cpu_count()} CPUs")
    print(f"{'relay':<36} {'Gbit/s':>8} {'CPU s':>7} {'CPU s/GB':>9} {'calls/GiB':>10}")
    for item in results:
        calls = f"{item.calls_per_gib:10.0f}" if item.calls_per_gib is not None else " " * 10
        print(
            f"{item.relay:<36} {item.gbit_per_s:8.2f} {item.relay_cpu_s:7.2f} "
            f"{item.relay_cpu_s_per_gb:9.3f} {calls}"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(item) for item in results], indent=2))


if __name__ == "__main__":
    main()
