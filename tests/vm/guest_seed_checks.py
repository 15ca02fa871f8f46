"""Checks that need a kernel with the seed patchset: run inside the VM guest.

``tests/vm/test_vm_seed.py`` boots each seed kernel and runs this file there
(by path: its name keeps a host ``pytest`` from collecting it, since the host
kernel has no fixed-provided buffers).  They show that the library finds the
strategy and the addr split by itself, that bytes survive tiny arenas under
that strategy, and that the split matters: entries written for the other
split send other bytes, or none.
"""

from __future__ import annotations

import errno
import hashlib
import random
import socket
from pathlib import Path

import pytest
import trio
from _reliability_helpers import drain, settle
from _streams import tcp_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trio_uring
from trio_uring import _abi
from trio_uring._features import features

BUNDLE = "fixed-provided-bundle"


def other_split(name: str) -> _abi.FixedProvidedSplit:
    return next(s for s in _abi.FIXED_PROVIDED_SPLITS.values() if s.name != name)


def test_the_seed_strategy_and_its_split_are_chosen_automatically() -> None:
    f = features()
    assert f.fixed_provided_send_zc, f.fixed_provided_detail
    assert f.strategy == BUNDLE
    assert f.fixed_provided_split in {s.name for s in _abi.FIXED_PROVIDED_SPLITS.values()}
    assert f.fixed_provided_split in f.fixed_provided_detail

    async def main() -> None:
        async with trio_uring.open_manager() as manager:
            assert manager.strategy == BUNDLE and manager.adaptive
            stream, peer = await tcp_pair()
            async with stream, peer:
                assert stream.stats().strategy == BUNDLE
                split = stream.provided_ring.split
                assert split is not None and split.name == f.fixed_provided_split
                await stream.send_all(b"probe")
                assert await peer.receive_some(5) == b"probe"

    trio.run(main)


async def _transfer(
    stream: trio_uring.ZeroCopyStream, peer: trio.SocketStream, payload: bytes, writes: list[int]
) -> bytes:
    got = bytearray()

    async def drain() -> None:
        async for chunk in peer:
            got.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        pos = 0
        for n in writes:
            await stream.send_all(payload[pos : pos + n])
            pos += n
        await stream.send_all(payload[pos:])
        await stream.send_eof()
    return bytes(got)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    forced=st.booleans(),
    slice_size=st.sampled_from([4096, 8192]) | st.integers(4096, 65536),
    n_slices=st.integers(2, 8),
    payload_size=st.integers(0, 1 << 20) | st.sampled_from([0, 1, 4095, 4096, 4097]),
    seed=st.integers(0, 2**32),
)
def test_any_payload_through_a_tiny_arena_arrives_intact(
    forced: bool, slice_size: int, n_slices: int, payload_size: int, seed: int
) -> None:
    """Invariant 2 under the seed strategy, with arenas small enough that
    every send waits for notifications to recycle slices.  ``forced`` keeps
    the bundle path for the whole payload; otherwise the library chose it,
    and may leave it once loopback's copied notifications pile up."""
    rng = random.Random(seed)
    payload = rng.randbytes(payload_size)
    writes = [rng.randrange(0, 3 * slice_size) for _ in range(rng.randrange(0, 6))]

    async def main() -> None:
        async with trio_uring.open_manager(
            strategy=BUNDLE if forced else None,
            slice_size=slice_size,
            arena_size=n_slices * slice_size,
        ) as manager:
            assert manager.strategy == BUNDLE
            stream, peer = await tcp_pair()
            async with stream, peer:
                with trio.fail_after(60):
                    got = await _transfer(stream, peer, payload, writes)
                if payload and forced:
                    assert stream.stats().strategy == BUNDLE
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
            await settle(manager)

    trio.run(main)


@pytest.mark.parametrize("split", ["probed", "other"])
def test_entries_in_the_other_split_send_wrong_bytes(split: str) -> None:
    """Why the split is probed: the same stream, writing its entries in the
    split this kernel does not decode, puts other bytes on the wire (20/44
    entries read as 32/32 name offsets 4096 times too small) or fails the
    send (32/32 entries read as 20/44 name offsets past the arena)."""
    slice_size, n_slices = 4096, 16
    payload = b"".join(i.to_bytes(4, "little") * (slice_size // 4) for i in range(1, 9))
    probed = features().fixed_provided_split
    assert probed is not None

    async def main() -> tuple[bytes, BaseException | None]:
        got = bytearray()
        error: BaseException | None = None
        async with trio_uring.open_manager(
            strategy=BUNDLE, slice_size=slice_size, arena_size=n_slices * slice_size
        ) as manager:
            # Something other than the payload in every slice first, so no
            # stale copy of it can pass for the right bytes.
            manager.arena.view[: manager.arena.size] = b"\xee" * manager.arena.size
            stream, peer = await tcp_pair()
            if split == "other":
                stream.provided_ring.split = other_split(probed)

            async def drain() -> None:
                async for chunk in peer:
                    got.extend(chunk)

            with trio.fail_after(30):
                async with peer, trio.open_nursery() as nursery:
                    nursery.start_soon(drain)
                    try:
                        # Closing the stream (on leaving this block) ends the drain.
                        async with stream:
                            await stream.send_all(payload)
                            await stream.send_eof()
                    except trio.BrokenResourceError as exc:
                        error = exc
        return bytes(got), error

    got, error = trio.run(main)
    if split == "probed":
        assert error is None
        assert got == payload
        return
    assert got != payload
    if error is None:
        # Read as 32/32, the 20/44 entry of slice k is offset k: every entry
        # after the first starts inside slice 0, which holds the first chunk.
        assert probed == "32/32"
        assert len(got) == len(payload)
        assert got[:slice_size] == payload[:slice_size]
    else:
        # Read as 20/44, the 32/32 entry of slice k >= 1 is offset
        # k * 4096 << 12, past the registered arena: the kernel refuses it.
        assert probed == "20/44"
        cause = error.__cause__
        assert isinstance(cause, OSError) and cause.errno in {errno.EFAULT, errno.EOVERFLOW}
        assert got == payload[: len(got)] and len(got) < len(payload)


@pytest.mark.parametrize("plain", ["arena-full", "send-file"])
def test_bundles_after_plain_sends_arrive_intact(plain: str, tmp_path: Path) -> None:
    """Why a bundle stream leaves the bundle path when its socket holds
    bytes that no request of its own put there (``after_plain_sends``): a
    plain ``send()`` while other streams hold every slice, or a
    ``send_file`` splice (or bytes written before the socket was wrapped,
    checked on the host).  The patchset
    turns an entry that starts exactly at the end of the registered buffer's
    first page into a zero-length first segment; TCP only trips over it when
    it appends the entry to an unsent tail of the write queue whose pages
    came from plain sends or splices (it then takes page references segment
    by segment and fails with EFAULT).  TCP_CORK keeps the last of those
    bytes unsent, so the next request, which names the slice one page in,
    meets them."""
    slice_size = 4096
    first = random.Random(plain).randbytes(128 * 1024 if plain == "send-file" else 100)
    payload = first + bytes(range(256)) * (8 * slice_size // 256)
    path = tmp_path / "body"
    path.write_bytes(first)

    async def main() -> None:
        async with trio_uring.open_manager(
            slice_size=slice_size, arena_size=8 * slice_size
        ) as manager:
            assert manager.strategy == BUNDLE
            stream, peer = await tcp_pair()
            stream.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            free = manager.arena.free_slices
            assert 1 in free  # the slice that starts one page into the buffer
            got = bytearray()
            with trio.fail_after(30):
                async with stream, peer, trio.open_nursery() as nursery:
                    nursery.start_soon(drain, peer, got)
                    if plain == "arena-full":
                        taken = free[:]
                        free.clear()
                        await stream.send_all(first)  # no free slice: plain send()
                        free.extend(taken)
                    elif plain == "send-file":
                        await stream.send_file(path)  # 128 KiB: spliced
                    await stream.send_all(payload[len(first) :])  # every slice
                    await trio.testing.wait_all_tasks_blocked(0.05)
                    stream.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
                    await stream.send_eof()
            assert manager.stats()["arena_full_sends"] == (plain == "arena-full")
            assert stream.stats().strategy == "fixed-single"
            assert bytes(got) == payload
            await settle(manager)

    trio.run(main)
