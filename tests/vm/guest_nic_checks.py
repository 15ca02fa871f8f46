"""Zero copy for real: run inside the VM guest, sending over its virtio NIC.

``tests/vm/test_vm_nic.py`` gives the guest a virtio-net device whose tap
lives in a private network namespace on the host, with ``nic_sink.py``
listening there (``TRIO_URING_NIC_SINK=address:port``).  Unlike loopback
and veth, this device reads the sent pages itself: notifications report
zero copy, and they arrive only once the receiver has acknowledged the
data.  That is where a slice reused before its notification would corrupt
bytes on the wire, so every check compares SHA-256 at both ends.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random

import pytest
import trio
from _reliability_helpers import assert_quiet, settle

import trio_uring
from trio_uring._features import features

BUNDLE = "fixed-provided-bundle"
HOST, _, PORT = os.environ.get("TRIO_URING_NIC_SINK", "").partition(":")
#: Zero-copy strategies this guest kernel runs, forced one at a time.
FORCED = [
    s
    for s, ok in (
        (BUNDLE, features().fixed_provided_send_zc),
        ("vectored-fixed", features().sendmsg_zc_fixed_vectored),
        ("fixed-single", features().send_zc_fixed),
    )
    if ok
]

pytestmark = pytest.mark.skipif(not HOST, reason="TRIO_URING_NIC_SINK is not set")


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def connect(name: str, mode: str = "sink", n: int = 0) -> trio_uring.ZeroCopyStream:
    stream = await trio_uring.open_tcp_stream(HOST, int(PORT))
    await stream.send_all(f"{name} {mode} {n}\n".encode())
    return stream


async def sink_result(name: str) -> dict[str, object]:
    """What the receiver got on connection ``name``, once it has ended."""
    with trio.fail_after(120):
        sock = await trio.open_tcp_stream(HOST, int(PORT))
        async with sock:
            await sock.send_all(f"? {name}\n".encode())
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = await sock.receive_some(4096)
                assert chunk, "the receiver closed without a result"
                reply += chunk
    return json.loads(reply)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def send_in_pieces(stream: trio_uring.ZeroCopyStream, data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        n = rng.choice((4096, 65536, 1 << 20, rng.randrange(1, 200_000)))
        await stream.send_all(data[pos : pos + n])
        pos += n


@pytest.mark.parametrize("strategy", [None, *FORCED], ids=["auto", *FORCED])
async def test_notifications_report_zero_copy_and_bytes_arrive(strategy: str | None) -> None:
    """The library's own choice keeps zero copy here (the adaptive policy
    leaves it only when notifications say copied), and every forced
    zero-copy strategy is really zero copy over this device."""
    data = payload(1, 16 << 20)
    name = f"zc-{strategy or 'auto'}"
    async with trio_uring.open_manager(strategy=strategy) as manager:
        assert manager.strategy == (strategy or BUNDLE)
        stream = await connect(name)
        with trio.fail_after(300):
            await send_in_pieces(stream, data, 1)
            await settle(manager, timeout=60)
            stats = stream.stats()
            await stream.aclose()
        result = await sink_result(name)
        assert result == {"bytes": len(data), "sha256": sha(data), "end": "eof"}
        # One request per flush of the outbound queue (hundreds of KiB
        # each): every one of them notified.
        assert stats.notifications == stats.sends >= 16, stats
        assert stats.notifications_zerocopy > 0, stats
        if stats.strategy == BUNDLE:
            # One request per batch of slices: nearly every notification
            # says zero copy (measured: none or one copied in a run).
            assert stats.notifications_copied * 10 <= stats.notifications, stats
        # One request per 16 KiB slice (fixed-single) measured 0.1-33 % of
        # notifications flagged copied, varying from run to run with how
        # back-to-back the requests were (likely cause: the kernel links the
        # notification of a request whose data joins the previous request's
        # skb to that request's, and records zero-copy use on the first
        # only).  Notifications saying zero copy, which loopback never
        # gives, are what this strategy is checked for.
        assert stats.strategy == (strategy or BUNDLE), stats
        assert_quiet(manager)


async def test_tiny_arena_and_slow_readers_reuse_no_slice_early() -> None:
    """Invariant 1 with late notifications: four streams share four slices
    while their receivers pause, so every send waits for a notification the
    device delivers only after the receiver's ACK."""
    chunk = 4096
    async with trio_uring.open_manager(slice_size=chunk, arena_size=4 * chunk) as manager:
        datas = [
            b"".join((i * 1000 + k).to_bytes(4, "little") * (chunk // 4) for k in range(300))
            for i in range(4)
        ]

        stats: list[trio_uring.StreamStats] = []

        async def one(i: int) -> None:
            stream = await connect(f"reuse-{i}", "slow", 256 * 1024)
            async with stream:
                for k in range(0, len(datas[i]), chunk):
                    await stream.send_all(datas[i][k : k + chunk])
                stats.append(stream.stats())

        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(one, i)
            for i in range(4):
                result = await sink_result(f"reuse-{i}")
                assert result == {"bytes": len(datas[i]), "sha256": sha(datas[i]), "end": "eof"}
            await settle(manager, timeout=60)
        assert all(s.strategy == BUNDLE and s.notifications_copied == 0 for s in stats), stats
        assert sum(s.notifications_zerocopy for s in stats) > 0
        assert_quiet(manager)


async def test_cancelled_send_all_sends_a_clean_prefix() -> None:
    """A send_all cancelled while its pages are on the wire breaks the stream
    (trio's rule for a partial send), and what did arrive is an exact prefix;
    every slice comes back once the device is done with it."""
    data = payload(2, 32 << 20)
    async with trio_uring.open_manager(slice_size=65536, arena_size=16 * 65536) as manager:
        # The receiver pauses every 256 KiB: 32 MiB take longer than a second.
        stream = await connect("cancel", "slow", 256 * 1024)
        with trio.move_on_after(1.0) as scope:
            await stream.send_all(data)
        assert scope.cancelled_caught
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"more")
        await stream.aclose()
        result = await sink_result("cancel")
        assert result["end"] == "eof"
        got = result["bytes"]
        assert isinstance(got, int) and 0 < got < len(data)
        assert result["sha256"] == sha(data[:got])
        await settle(manager, timeout=60)
        assert_quiet(manager)


async def test_peer_reset_mid_send_is_broken_resource_and_corrupts_nothing() -> None:
    data = payload(3, 32 << 20)
    cut = 3 << 20
    async with trio_uring.open_manager() as manager:
        stream = await connect("reset", "reset", cut)
        with trio.fail_after(300):
            with pytest.raises(trio.BrokenResourceError) as info:
                # Ten times what the receiver reads before it resets.
                await send_in_pieces(stream, data, 3)
            cause = info.value.__cause__
            assert isinstance(cause, OSError), repr(cause)
            assert cause.errno in {errno.ECONNRESET, errno.EPIPE}
            await stream.aclose()
            await settle(manager, timeout=60)
        result = await sink_result("reset")
        assert result == {"bytes": cut, "sha256": sha(data[:cut]), "end": "reset"}
        assert_quiet(manager)
