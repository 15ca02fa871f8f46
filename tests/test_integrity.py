"""Bytes arrive in order and intact, for any split, strategy and arena size."""

from __future__ import annotations

import hashlib
import random

import pytest
import trio
from _streams import runnable_strategies, tcp_pair, unix_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trio_uring

SLICE_SIZES = st.sampled_from([4096, 8192, 65536, 1 << 20]) | st.integers(4096, 1 << 20)


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def transfer(stream, peer, payload: bytes, writes: list[int]) -> bytes:
    """send_all ``payload`` split at ``writes``; return what the peer got."""
    received = bytearray()

    async def drain() -> None:
        async for chunk in peer:
            received.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        pos = 0
        for n in writes:
            await stream.send_all(payload[pos : pos + n])
            pos += n
        await stream.send_all(payload[pos:])
        await stream.send_eof()
    return bytes(received)


def run_case(strategy: str, family: str, slice_size: int, payload_size: int, seed: int) -> None:
    payload = pattern(payload_size, seed)
    rng = random.Random(seed)
    writes = [rng.randrange(0, 3 * slice_size) for _ in range(rng.randrange(0, 6))]

    async def main() -> None:
        async with trio_uring.open_manager(
            strategy=strategy, slice_size=slice_size, arena_size=8 * slice_size
        ) as manager:
            stream, peer = await (tcp_pair() if family == "tcp" else unix_pair())
            async with stream, peer:
                with trio.fail_after(60):
                    got = await transfer(stream, peer, payload, writes)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            with trio.fail_after(10):
                while manager.arena.free_count != manager.arena.n_slices:
                    await trio.sleep(0.005)

    trio.run(main)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    strategy=st.sampled_from(runnable_strategies()),
    family=st.sampled_from(["tcp", "unix"]),
    slice_size=SLICE_SIZES,
    payload_size=st.integers(0, 8 << 20) | st.sampled_from([0, 1, 4095, 4096, 4097]),
    seed=st.integers(0, 2**32),
)
def test_any_payload_any_slice_size_arrives_intact(
    strategy: str, family: str, slice_size: int, payload_size: int, seed: int
) -> None:
    run_case(strategy, family, slice_size, payload_size, seed)


def test_every_strategy_and_family_at_the_extremes() -> None:
    for strategy in runnable_strategies():
        for family in ("tcp", "unix"):
            run_case(strategy, family, 4096, 8 << 20, 1)
            run_case(strategy, family, 1 << 20, 1, 2)


async def many_streams(count: int, base_size: int, writes: list[int]) -> None:
    """``count`` concurrent streams through the current manager, each checked."""
    results: dict[int, bool] = {}

    async def one(i: int) -> None:
        payload = pattern(base_size + i * 997, i)
        stream, peer = await tcp_pair()
        async with stream, peer:
            got = await transfer(stream, peer, payload, writes)
        results[i] = got == payload

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
    assert results == {i: True for i in range(count)}


async def test_thirty_two_streams_share_an_arena_of_eight_slices() -> None:
    async with trio_uring.open_manager(slice_size=4096, arena_size=8 * 4096) as manager:
        await many_streams(32, 200_000, [1000, 70_000])
        with trio.fail_after(10):
            while manager.arena.free_count != manager.arena.n_slices:
                await trio.sleep(0.005)


async def test_sixty_four_streams_on_sixteen_slices() -> None:
    async with trio_uring.open_manager(slice_size=4096, arena_size=16 * 4096) as manager:
        await many_streams(64, 50_000, [4096, 9000])
        with trio.fail_after(10):
            while manager.ring is not None and manager.ring.table:
                await trio.sleep(0.005)


@pytest.mark.skipif(not trio_uring.features().io_uring, reason="needs io_uring")
async def test_streams_over_an_sqpoll_ring() -> None:
    """With a kernel submission thread nothing completes during submission:
    every send and receive goes through the completion task."""
    async with trio_uring.open_manager(
        sqpoll=True, strategy="vectored-fixed", slice_size=4096, arena_size=16 * 4096
    ) as manager:
        assert manager.ring is not None and manager.ring.sqpoll
        await many_streams(8, 100_000, [1, 4096, 70_000])


@pytest.mark.parametrize("strategy", runnable_strategies())
async def test_burst_of_one_byte_sends_then_aclose_delivers_every_byte(strategy: str) -> None:
    """10,000 one-byte send_all calls, then aclose at once: the graceful
    close sends everything still queued before the socket goes."""
    async with trio_uring.open_manager(strategy=strategy):
        stream, peer = await tcp_pair()
        got = bytearray()

        async def read() -> None:
            async for chunk in peer:
                got.extend(chunk)

        expected = bytes(i % 251 for i in range(10_000))
        async with peer, trio.open_nursery() as nursery:
            nursery.start_soon(read)
            for byte in expected:
                await stream.send_all(bytes([byte]))
            await stream.aclose()
        assert bytes(got) == expected


@pytest.mark.parametrize("strategy", runnable_strategies())
async def test_random_sizes_up_to_4_mib_through_a_tiny_arena(strategy: str) -> None:
    """Messages of 1 B to 4 MiB through an arena of four 4 KiB slices: every
    message waits for slices many times, and every byte arrives in order."""
    rng = random.Random(f"sizes-{strategy}")
    sizes = [rng.choice((1, 7, 4095, 4096, 4097, 65_537, 1 << 20, 4 << 20)) for _ in range(12)]
    async with trio_uring.open_manager(
        strategy=strategy, slice_size=4096, arena_size=4 * 4096
    ) as manager:
        stream, peer = await tcp_pair()
        digest_in = hashlib.sha256()
        digest_out = hashlib.sha256()

        async def read() -> None:
            async for chunk in peer:
                digest_in.update(chunk)

        with trio.fail_after(120):
            async with peer, trio.open_nursery() as nursery:
                nursery.start_soon(read)
                for i, size in enumerate(sizes):
                    data = hashlib.sha256(i.to_bytes(4, "little")).digest() * (size // 32 + 1)
                    data = data[:size]
                    digest_out.update(data)
                    await stream.send_all(data)
                await stream.aclose()
        assert digest_in.hexdigest() == digest_out.hexdigest()
        with trio.fail_after(5):
            while manager.arena.free_count != manager.arena.n_slices:
                await trio.sleep(0.005)


@pytest.mark.skipif(not trio_uring.features().io_uring, reason="needs io_uring")
async def test_aclose_wakes_a_blocked_receive_on_an_sqpoll_ring() -> None:
    """The kernel's submission thread, asleep after its idle time, may read
    aclose's cancel only after the socket is closed: the cancel must not
    depend on the fd number then."""
    async with trio_uring.open_manager(sqpoll=True):
        for _ in range(3):
            stream, peer = await tcp_pair()

            async def receive(stream: trio_uring.ZeroCopyStream) -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await stream.receive_some(10)

            with trio.fail_after(5):
                async with peer, trio.open_nursery() as nursery:
                    nursery.start_soon(receive, stream)
                    await trio.sleep(0.2)  # past the thread's idle time: it sleeps
                    await stream.aclose()
