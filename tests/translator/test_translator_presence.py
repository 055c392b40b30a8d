"""translator.stack.ServaldPresence: what the watches of relayed flows wait on before they
hand their flows back to a restarted servald (the full story: test_translator_adopt.py)."""

from __future__ import annotations

import asyncio

from translator.stack import ServaldPresence, servald_presence


def test_presence_counts_comebacks_and_wakes_waiters() -> None:
    async def scenario() -> None:
        presence = ServaldPresence()
        presence.mark(True)
        assert presence.epoch == 1
        presence.mark(True)  # still up: the same epoch
        assert presence.epoch == 1
        assert not presence.back_since(1)
        presence.mark(False)
        waiter = asyncio.ensure_future(presence.wait_back(1, timeout_s=10))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        presence.mark(True)
        assert await asyncio.wait_for(waiter, 1) is True
        assert presence.epoch == 2
        # Already back: no wait at all. Not back: the timeout, then False.
        assert await presence.wait_back(1, timeout_s=0) is True
        presence.mark(False)
        assert await presence.wait_back(2, timeout_s=0.01) is False

    asyncio.run(scenario())


def test_one_presence_per_control_socket_and_it_outlives_event_loops() -> None:
    first = servald_presence("/run/test-presence-a.sock")
    assert servald_presence("/run/test-presence-a.sock") is first
    assert servald_presence("/run/test-presence-b.sock") is not first

    async def wait_briefly() -> bool:
        return await first.wait_back(first.epoch, timeout_s=0.01)

    assert asyncio.run(wait_briefly()) is False
    assert asyncio.run(wait_briefly()) is False  # a second loop: no stale future bound
