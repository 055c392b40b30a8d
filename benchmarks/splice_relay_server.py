#!/usr/bin/env python3
"""A minimal TCP relay on the splice_ext engine, the engine's contender in relay_bench.py.

    python benchmarks/splice_relay_server.py --listen 10.77.1.2:7001 --connect 10.77.2.2:5201

It accepts clients, opens a connection to the origin for each (non-blocking connect) and hands
the pair to `splice_ext.Relay`; from then on every byte is moved by the engine's GIL-free
workers. The Python side only runs per connection (accept, connect, hand-off) and per
completion record, so the relay process's CPU time over a bulk transfer is the engine's.

Signals: SIGUSR1 writes the engine counters as JSON to --stats-file (atomically: the benchmark
reads it without seeing half a file); SIGTERM / SIGINT stop the relay (remaining pairs are
aborted) and exit 0.

It keeps no Python object per relayed pair (fds are detached into the engine), so the RSS delta
of this process per idle pair is the engine's per-pair state plus allocator overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO_ROOT))

from splice_ext import Relay  # noqa: E402

LISTEN_BACKLOG = 4096  # somaxconn: the kernel caps it anyway
MAX_ACCEPTS_PER_WAKEUP = 64  # bounded, so completions and connects are served during a burst
SELECT_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 5.0
WANTED_FD_LIMIT = 1 << 17  # 10,000 pairs need 20,000 sockets plus pipes; keep headroom


def parse_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= WANTED_FD_LIMIT:
        return
    if hard != resource.RLIM_INFINITY and hard < WANTED_FD_LIMIT:
        try:  # root (the benchmark) may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (WANTED_FD_LIMIT, WANTED_FD_LIMIT))
            return
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return
    resource.setrlimit(resource.RLIMIT_NOFILE, (WANTED_FD_LIMIT, hard))


class RelayServer:
    """Listener + pending upstream connects + completion drain, on one selector."""

    def __init__(
        self,
        listen: tuple[str, int],
        origin: tuple[str, int],
        relay: Relay,
        stats_file: Path | None,
        nodelay: bool,
    ) -> None:
        self.origin = origin
        self.nodelay = nodelay
        self.relay = relay
        self.stats_file = stats_file
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(listen)
        self.listener.listen(LISTEN_BACKLOG)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(relay.completion_fd(), selectors.EVENT_READ, "completions")
        # upstream socket -> (client socket, connect deadline)
        self.pending: dict[socket.socket, tuple[socket.socket, float]] = {}
        self.accepted = 0
        self.paired = 0
        self.connect_failures = 0
        self.completions = 0
        self.reasons: dict[str, int] = {}
        self.stopping = False

    # -- events ---------------------------------------------------------------------------

    def serve(self) -> None:
        while not self.stopping:
            for key, _ in self.selector.select(SELECT_TIMEOUT_S):
                if key.data == "accept":
                    self._accept_burst()
                elif key.data == "completions":
                    self._drain_completions()
                else:
                    self._connected(key.fileobj)  # type: ignore[arg-type]
            self._expire_connects()

    def _accept_burst(self) -> None:
        for _ in range(MAX_ACCEPTS_PER_WAKEUP):
            try:
                client, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                    return
                raise
            self.accepted += 1
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            upstream.setblocking(False)
            code = upstream.connect_ex(self.origin)
            if code in (0, errno.EINPROGRESS):
                self.pending[upstream] = (client, time.monotonic() + CONNECT_TIMEOUT_S)
                self.selector.register(upstream, selectors.EVENT_WRITE, "connect")
            else:
                self.connect_failures += 1
                upstream.close()
                client.close()

    def _connected(self, upstream: socket.socket) -> None:
        self.selector.unregister(upstream)
        client, _ = self.pending.pop(upstream)
        if upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
            self.connect_failures += 1
            upstream.close()
            client.close()
            return
        if self.nodelay:
            # HAProxy sets TCP_NODELAY on both of its connections; without it Nagle holds the
            # sub-MSS tail of each splice-out until everything before it is ACKed, which cost
            # ~2% of goodput through a 1 Gbit/s tbf (socat shows the same with and without
            # its `nodelay` option).
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The engine owns both fds from here on; no Python object stays behind per pair.
        self.relay.add_pair(client.detach(), upstream.detach())
        self.paired += 1

    def _expire_connects(self) -> None:
        now = time.monotonic()
        for upstream, (client, deadline) in list(self.pending.items()):
            if now >= deadline:
                self.selector.unregister(upstream)
                del self.pending[upstream]
                self.connect_failures += 1
                upstream.close()
                client.close()

    def _drain_completions(self) -> None:
        for completion in self.relay.read_completions():
            self.completions += 1
            self.reasons[completion.reason] = self.reasons.get(completion.reason, 0) + 1

    # -- control ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        workers = [asdict(worker) for worker in self.relay.worker_stats()]
        totals: dict[str, int] = {}
        for worker in workers:
            for name, value in worker.items():
                if name != "worker" and isinstance(value, int):
                    totals[name] = totals.get(name, 0) + value
        totals["pipes_open"] = totals.get("pipes_pooled", 0) + totals.get("pipes_in_use", 0)
        return {
            "pid": os.getpid(),
            "pipe_size": self.relay.pipe_size,
            "read_ahead_bytes": self.relay.read_ahead_bytes,
            "max_rounds": self.relay.max_rounds,
            "lowat_bytes": self.relay.lowat_bytes,
            "workers": workers,
            "totals": totals,
            "live_pairs": totals.get("active_pairs", 0),
            "accepted": self.accepted,
            "paired": self.paired,
            "pending_connects": len(self.pending),
            "connect_failures": self.connect_failures,
            "completions": self.completions,
            "completion_reasons": self.reasons,
        }

    def write_stats(self) -> None:
        if self.stats_file is None:
            return
        temporary = self.stats_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.stats()))
        temporary.replace(self.stats_file)

    def close(self) -> None:
        for upstream, (client, _) in self.pending.items():
            upstream.close()
            client.close()
        self.pending.clear()
        self.selector.close()
        self.listener.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--listen", type=parse_endpoint, required=True, help="HOST:PORT")
    parser.add_argument("--connect", type=parse_endpoint, required=True, help="origin HOST:PORT")
    parser.add_argument("--workers", type=int, default=None, help="default: one per CPU")
    parser.add_argument("--pipe-size", type=int, default=1 << 20, help="bytes per relay pipe")
    parser.add_argument("--nodelay", action=argparse.BooleanOptionalAction, default=True,
                        help="set TCP_NODELAY on both sockets, as HAProxy does (default: on)")
    # Engine tuning, so that relay_bench.py can run variants side by side (--engine-variant).
    parser.add_argument("--read-ahead", type=int, default=None,
                        help="bytes read into a pipe while its destination is blocked "
                        "(default: the pipe size)")
    parser.add_argument("--max-rounds", type=int, default=None,
                        help="splice-in/splice-out rounds per direction per dispatch")
    parser.add_argument("--splice-more", action="store_true",
                        help="experiment: SPLICE_F_MORE on splice-out while the source is readable")
    parser.add_argument("--lowat", type=int, default=None,
                        help="SO_RCVLOWAT bytes for fast streaming sources (0: off; default: "
                        "the engine's, 256 KiB)")
    parser.add_argument("--lowat-hold", type=float, default=None,
                        help="seconds without input before a raised SO_RCVLOWAT is cleared")
    parser.add_argument("--stats-file", type=Path, default=None,
                        help="where SIGUSR1 writes the engine counters as JSON")
    args = parser.parse_args(argv)

    raise_fd_limit()
    tuning: dict[str, Any] = {}
    if args.read_ahead is not None:
        tuning["read_ahead_bytes"] = args.read_ahead
    if args.max_rounds is not None:
        tuning["max_rounds"] = args.max_rounds
    if args.splice_more:
        tuning["splice_more"] = True
    if args.lowat is not None:
        tuning["lowat_bytes"] = args.lowat
    if args.lowat_hold is not None:
        tuning["lowat_hold_s"] = args.lowat_hold
    relay = Relay(workers=args.workers, pipe_size=args.pipe_size, **tuning)
    server = RelayServer(args.listen, args.connect, relay, args.stats_file, args.nodelay)

    def on_stats(signum: int, frame: FrameType | None) -> None:
        server.write_stats()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        server.stopping = True

    signal.signal(signal.SIGUSR1, on_stats)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    try:
        server.serve()
    finally:
        server.close()
        relay.stop()
        with contextlib.suppress(OSError):
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
