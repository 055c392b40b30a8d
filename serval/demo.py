"""`make demo`: a readable end-to-end trace of the SAL protocol.

This is the in-memory demonstration: a client, a service router and two instances of one
service registered with weights 3 and 1, exchanging real encoded SAL packets under a simulated
clock (serval/sim.py). It shows registration, late binding on the first packet through the
router, the direct SYN-ACK, a close, a lost SYN recovered by re-resolution, a migration, and the
weighted spread of 400 connections.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address

from serval.core.flow import Flow, FlowState
from serval.core.ids import ServiceID
from serval.core.wire import ControlFlags, SalPacket
from serval.sim import Host, Network, Router, Transmission

SERVICE = ServiceID.from_name("web.example")
ROUTER = IPv4Address("10.0.0.1")
CLIENT = IPv4Address("10.0.2.1")
WEIGHTS = {"instance-a": 3, "instance-b": 1}


def describe(packet: SalPacket) -> str:
    """One packet as a short human-readable line."""
    parts = []
    if packet.control is not None:
        names = [flag.name for flag in ControlFlags if flag and flag in packet.control.flags]
        parts.append("|".join(n for n in names if n) or "DATA")
        parts.append(f"verno={packet.control.verno} ackno={packet.control.ackno}")
    elif packet.register is not None:
        reg = packet.register
        parts.append(f"{reg.op.name} weight={reg.weight} addr={reg.address}")
    if packet.services and packet.register is None:
        parts.append(f"service={str(packet.services[0].service)[:12]}...")
    if packet.source is not None:
        parts.append("trail=" + ",".join(str(a) for a in packet.source.addresses))
    if packet.transport is not None:
        t = packet.transport
        parts.append(f"tcp={t.address}:{t.port} isn={t.isn} mss={t.mss} wscale={t.window_scale}")
    if packet.migrate is not None:
        parts.append(f"new={packet.migrate.address} rcv_nxt={packet.migrate.rcv_nxt}")
    if packet.auth is not None:
        parts.append("authenticated")
    return f"flow {packet.src_flow}->{packet.dst_flow} " + " ".join(parts)


class Tracer:
    """Prints every datagram the network carries from a chosen moment on."""

    def __init__(self, net: Network, names: dict[IPv4Address, str]) -> None:
        self.net = net
        self.names = names
        self.start = net.now
        self.seen = len(net.log)

    def flush(self, keep: Callable[[Transmission], bool] = lambda t: True) -> None:
        for t in self.net.log[self.seen :]:
            if keep(t):
                src = self.names.get(t.source, str(t.source))  # type: ignore[arg-type]
                dst = self.names.get(t.destination, str(t.destination))  # type: ignore[arg-type]
                print(f"  {1000 * (t.time - self.start):8.1f} ms  {src:>10} -> {dst:<10} "
                      f"{describe(t.packet)}")
        self.seen = len(self.net.log)


def heading(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 76 - len(text)))


def run(connections: int) -> int:
    net = Network(seed=7)
    router = Router(net, "router", ROUTER)
    names = {ROUTER: "router", CLIENT: "client"}
    instances: list[Host] = []
    for index, (name, weight) in enumerate(WEIGHTS.items()):
        address = IPv4Address(f"10.0.1.{index + 1}")
        host = Host(net, name, address, routers=(ROUTER,))
        host.listen(SERVICE, weight=weight)
        instances.append(host)
        names[address] = name
    client = Host(net, "client", CLIENT, routers=(ROUTER,))
    tracer = Tracer(net, names)

    heading(f"registration: two instances of {SERVICE} (weights 3 and 1)")
    net.run_for(1.2)
    tracer.flush(lambda t: t.packet.register is not None)
    print(f"  router table: {len(router.registrations)} registered instances")

    heading("connect by serviceID: SYN resolved by the router, SYN-ACK direct")
    flow = client.connect(SERVICE)
    net.run_for(0.2)
    tracer.flush(lambda t: t.packet.register is None)
    server = _server_end(instances, flow)
    print(f"  client flow {flow.local_flow} is {flow.state.name}, served by {server[0].name}")

    heading("close: the client first (half-close), then the server (TIME_WAIT on the client)")
    client.close(flow)
    net.run_for(0.1)
    server[0].close(server[1])
    net.run_for(0.1)
    tracer.flush(lambda t: t.packet.register is None)
    print(f"  client: {flow.state.name}, server: {server[1].state.name}")

    heading("a lost SYN: retransmitted after 250 ms and resolved again")
    net.drop_matching(lambda s, d, p: s == CLIENT and p.flags == ControlFlags.SYN)
    flow = client.connect(SERVICE)
    net.run_for(0.6)
    tracer.flush(lambda t: t.packet.register is None)
    print(f"  client flow {flow.local_flow} is {flow.state.name}")

    heading("migration: the client moves to 10.0.3.1 (RSYN, RSYN-ACK, ACK, authenticated)")
    new_address = IPv4Address("10.0.3.1")
    names[new_address] = "client'"
    client.migrate(flow, new_address)
    net.run_for(0.3)
    tracer.flush(lambda t: t.packet.register is None)
    print(f"  server now sends to {_server_end(instances, flow)[1].peer_address}")

    heading(f"weighted anycast: {connections} connections")
    flows = [client.connect(SERVICE) for _ in range(connections)]
    net.run_for(2.0)
    tracer.seen = len(net.log)
    spread = Counter(_server_end(instances, f)[0].name for f in flows)
    connected = sum(f.state is FlowState.CONNECTED for f in flows)
    total_weight = sum(WEIGHTS.values())
    for name, weight in WEIGHTS.items():
        share = spread[name] / connections
        bar = "#" * round(40 * share)
        print(f"  {name:<11} weight {weight}: {spread[name]:4d} ({share:6.1%}, "
              f"expected {weight / total_weight:.0%}) {bar}")
    print(f"  {connected}/{connections} connected; router forwarded "
          f"{router.counters.forwarded} SYNs and saw {router.counters.unexpected} other packets")
    return 0 if connected == connections else 1


def _server_end(instances: list[Host], client_flow: Flow) -> tuple[Host, Flow]:
    for host in instances:
        for flow in host.accepted[SERVICE]:
            if flow.peer_flow == client_flow.local_flow:
                return host, flow
    raise LookupError(f"no instance accepted flow {client_flow.local_flow}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=400)
    args = parser.parse_args(argv)
    return run(args.connections)


if __name__ == "__main__":
    raise SystemExit(main())
