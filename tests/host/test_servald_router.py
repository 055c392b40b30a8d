"""The router's forwarding decisions, in memory (no sockets): trail, loops, broadcast, DELAY."""

from __future__ import annotations

import random
from ipaddress import IPv4Address

from serval.core import wire
from serval.core.ids import ServiceID
from serval.core.service_table import ServiceTable, Target
from serval.core.wire import ControlExt, ControlFlags, SalPacket, ServiceExt, SourceExt
from serval.host.log import Counters, RateLimitedLog, get_logger
from serval.host.router import Forwarder
from serval.host.sal import Received

CLIENT = IPv4Address("10.0.0.10")
ROUTER = IPv4Address("10.0.0.1")
OTHER_ROUTER = IPv4Address("10.0.1.1")
INSTANCE_A = IPv4Address("10.0.0.21")
INSTANCE_B = IPv4Address("10.0.0.22")
SERVICE = ServiceID.parse("web.example")


def make(table: ServiceTable) -> tuple[Forwarder, list[tuple[bytes, IPv4Address, int]],
                                       Counters]:
    sent: list[tuple[bytes, IPv4Address, int]] = []
    counters = Counters()

    def send(data: bytes, address: object, port: int) -> bool:
        assert isinstance(address, IPv4Address)
        sent.append((data, address, port))
        return True

    forwarder = Forwarder(table, random.Random(7), counters, send, lambda _a: 54325,
                          lambda a: str(a).endswith(".255"), RateLimitedLog(get_logger()),
                          lambda: 0.0)
    return forwarder, sent, counters


def syn(source: SourceExt | None = None) -> SalPacket:
    return SalPacket(src_flow=5, dst_flow=0,
                     control=ControlExt(ControlFlags.SYN, 1, 0, bytes(8)),
                     services=(ServiceExt(SERVICE),), source=source)


def rx(source: IPv4Address = CLIENT, destination: IPv4Address = ROUTER) -> Received:
    return Received(b"", source, 54325, destination, 1)


def test_forward_extends_the_source_trail() -> None:
    table = ServiceTable()
    table.add(SERVICE, Target.forward(INSTANCE_A))
    forwarder, sent, counters = make(table)
    assert forwarder.forward(syn(), rx())
    (data, address, port), = sent
    assert (address, port) == (INSTANCE_A, 54325)
    forwarded = wire.decode(data)
    assert forwarded.source == SourceExt((CLIENT, ROUTER))
    assert counters.get("router.syn_forwarded") == 1


def test_second_router_appends_and_skips_targets_in_the_trail() -> None:
    table = ServiceTable()
    table.add(SERVICE, Target.forward(CLIENT))  # a target already in the trail: a loop
    table.add(SERVICE, Target.forward(INSTANCE_B))
    forwarder, sent, _ = make(table)
    for _ in range(20):
        assert forwarder.forward(syn(SourceExt((CLIENT, OTHER_ROUTER))),
                                 rx(OTHER_ROUTER, ROUTER))
    assert {address for _, address, _ in sent} == {INSTANCE_B}
    assert wire.decode(sent[0][0]).source == SourceExt((CLIENT, OTHER_ROUTER, ROUTER))


def test_loop_back_to_this_router_is_dropped() -> None:
    table = ServiceTable()
    table.add(SERVICE, Target.forward(INSTANCE_A))
    forwarder, sent, counters = make(table)
    assert not forwarder.forward(syn(SourceExt((CLIENT, ROUTER, OTHER_ROUTER))),
                                 rx(OTHER_ROUTER, ROUTER))
    assert not sent and counters.get("router.syn_loop_dropped") == 1


def test_broadcast_is_never_forwarded_and_no_route_is_silent() -> None:
    table = ServiceTable()
    table.add(SERVICE, Target.forward(INSTANCE_A))
    forwarder, sent, counters = make(table)
    assert not forwarder.forward(syn(), rx(destination=IPv4Address("10.0.0.255")))
    assert counters.get("router.syn_broadcast_not_forwarded") == 1
    empty_forwarder, empty_sent, empty_counters = make(ServiceTable())
    assert not empty_forwarder.forward(syn(), rx())
    assert not sent and not empty_sent and empty_counters.get("router.syn_no_route") == 1


def test_delay_holds_until_released_or_dropped() -> None:
    table = ServiceTable()
    table.add(SERVICE, Target.forward(INSTANCE_A))
    table.add(SERVICE, Target.delay(priority=10))
    forwarder, sent, _ = make(table)
    assert not forwarder.forward(syn(), rx())
    assert not forwarder.forward(syn(), rx())
    held = forwarder.delayed()
    assert [h.to_dict()["kind"] for h in held] == ["syn", "syn"]
    assert forwarder.drop(held[0].packet_id)
    assert forwarder.release(held[0].packet_id) is None  # already gone
    table.remove(SERVICE, Target.delay().key)
    assert forwarder.release(held[1].packet_id) is True
    assert [address for _, address, _ in sent] == [INSTANCE_A]
