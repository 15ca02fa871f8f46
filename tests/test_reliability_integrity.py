"""Issue 5, item 6: integrity under faults.

Checked streams send seeded payloads in random splits through a tiny arena
(every send recycles slices) to readers that are fast, slow, or stop and
resume (a stopped reader keeps zero-copy data queued in the kernel, which is
when a slice reused before its notification would corrupt the wire).  Around
them, chaos streams are cancelled mid-send and reset with SO_LINGER 0.  Every
byte each checked stream's ``send_all`` accepted must arrive intact and in
order: SHA-256 on both ends.
"""

from __future__ import annotations

import hashlib

import pytest
import trio
from _reliability_helpers import (
    assert_quiet,
    available_strategies,
    drain,
    env_int,
    payload,
    rng,
    rst_close,
    settle,
    stream_and_peer,
    stream_pair,
)

import trio_uring

CHECKED = env_int("TRIO_URING_INTEGRITY_STREAMS", 12)
CHAOS = env_int("TRIO_URING_INTEGRITY_CHAOS", 40)


async def _checked(i: int, results: list[tuple[bytes, bytes]]) -> None:
    r = rng("integrity", i)
    a, b = stream_pair()
    data = payload(i, r.choice((100_000, 700_000, 2_000_000)))
    got = bytearray()
    reader = ("fast", "slow", "stop-resume")[i % 3]

    async def read() -> None:
        if reader == "stop-resume":
            await trio.sleep(0.05)
        while True:
            chunk = await b.receive_some(r.choice((1, 4096, 65536)))
            if not chunk:
                return
            got.extend(chunk)
            if reader == "slow":
                await trio.sleep(0.0002)
            elif reader == "stop-resume" and r.random() < 0.02:
                await trio.sleep(0.02)

    sent = hashlib.sha256()
    async with a, b, trio.open_nursery() as nursery:
        nursery.start_soon(read)
        pos = 0
        while pos < len(data):
            n = r.choice((1, 17, 4095, 4096, 4097, 30_000, 131_072))
            await a.send_all(data[pos : pos + n])
            sent.update(data[pos : pos + n])
            pos += n
        await a.send_eof()
    results.append((sent.digest(), hashlib.sha256(got).digest()))


async def _chaos(i: int, counts: dict[str, int]) -> None:
    """A stream that is cancelled part way, then reset by its peer."""
    r = rng("chaos", i)
    stream, peer = stream_and_peer()
    async with trio.open_nursery() as nursery:
        if r.random() < 0.5:
            nursery.start_soon(drain, peer)
        with trio.move_on_after(r.uniform(0, 0.01)) as cs:
            while True:
                await stream.send_all(payload(i, r.choice((1000, 100_000, 500_000))))
        counts["cancelled"] += cs.cancelled_caught
        rst_close(peer.socket)
        try:
            await stream.receive_some()
        except trio.BrokenResourceError:
            counts["reset"] += 1
        nursery.cancel_scope.cancel()
    await stream.aclose()


@pytest.mark.parametrize("strategy", available_strategies())
async def test_integrity_under_cancellation_and_resets(strategy: str) -> None:
    counts = {"cancelled": 0, "reset": 0}
    results: list[tuple[bytes, bytes]] = []
    async with trio_uring.open_manager(
        arena_size=8 * 4096, slice_size=4096, strategy=strategy
    ) as manager:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(CHECKED):
                    nursery.start_soon(_checked, i, results)
                for i in range(CHAOS):
                    nursery.start_soon(_chaos, i, counts)
                    await trio.sleep(0.001)
        await settle(manager)
        assert_quiet(manager)
    assert len(results) == CHECKED
    bad = [i for i, (sent, got) in enumerate(results) if sent != got]
    assert not bad, f"checked streams {bad} received bytes that differ from what was sent"
    print(f"integrity[{strategy}]: {CHECKED} streams intact around {counts}")
    assert counts["cancelled"] > 0
