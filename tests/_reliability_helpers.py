"""Shared pieces of the reliability tests (issue 5).

Everything random here is driven by ``random.Random`` seeded from
``TRIO_URING_TEST_SEED`` (default 1234), so a failure reproduces.  Sizes of
the long tests come from environment variables with small CI defaults.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

import trio_uring
from trio_uring import _features
from trio_uring._manager import Multishot

SEED = int(os.environ.get("TRIO_URING_TEST_SEED", "1234"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env_int(name: str, default: int) -> int:
    """An integer test size from the environment, ``default`` when unset."""
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def rng(*salt: object) -> random.Random:
    """A generator seeded from ``SEED`` and ``salt`` (stable across runs)."""
    return random.Random(f"{SEED}:" + ":".join(map(str, salt)))


def available_strategies() -> list[str]:
    """The send strategies that can run in this process, best first."""
    f = trio_uring.features()
    if not f.io_uring:
        return ["socket"]
    out = []
    if f.fixed_provided_send_zc:
        out.append("fixed-provided-bundle")
    if f.sendmsg_zc_fixed_vectored:
        out.append("vectored-fixed")
    if f.send_zc_fixed:
        out.append("fixed-single")
    out += ["copy", "socket"]
    return out


def payload(seed: int, n: int) -> bytes:
    """``n`` bytes of content distinct per ``seed`` and per position, so a
    reordered, duplicated or overwritten slice changes the digest."""
    block = hashlib.sha256(seed.to_bytes(8, "little", signed=True)).digest()
    reps = -(-n // 32)
    out = bytearray(block * reps)
    # Stamp the block number every 32 bytes so equal blocks are told apart.
    for i in range(0, len(out), 4096):
        out[i : i + 4] = (i // 4096).to_bytes(4, "little")
    return bytes(out[:n])


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vectored_fixed_with_a_successor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give vectored-fixed the bundle strategy's ``after_plain_sends``
    successor (fixed-single), so that the switch it makes can be tested on
    a kernel without the bundle strategy; skip where vectored-fixed does
    not run."""
    if "vectored-fixed" not in available_strategies():
        pytest.skip("vectored-fixed does not run here")
    from trio_uring._send import STRATEGY_IMPLS

    monkeypatch.setattr(STRATEGY_IMPLS["vectored-fixed"], "after_plain_sends", "fixed-single")


def stdlib_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair of blocking stdlib sockets."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def trio_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    a, b = stdlib_pair()
    return trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)


def stream_pair() -> tuple[trio_uring.ZeroCopyStream, trio_uring.ZeroCopyStream]:
    """Two ZeroCopyStreams connected over loopback TCP."""
    a, b = trio_pair()
    return trio_uring.ZeroCopyStream(a), trio_uring.ZeroCopyStream(b)


def stream_and_peer() -> tuple[trio_uring.ZeroCopyStream, trio.SocketStream]:
    """A ZeroCopyStream and, on the other end, a plain trio SocketStream."""
    a, b = trio_pair()
    return trio_uring.ZeroCopyStream(a), trio.SocketStream(b)


def rst_close(sock: socket.socket | trio.socket.SocketType) -> None:
    """Close with SO_LINGER 0: the kernel sends a reset instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def foreign_entries(manager: trio_uring.IOManager) -> list[object]:
    """Table entries that are not long-lived listeners (multishot accepts)."""
    if manager.ring is None:
        return []
    return [e for e in manager.ring.table.values() if not isinstance(e, Multishot)]


async def settle(manager: trio_uring.IOManager, timeout: float = 10.0) -> None:
    """Wait until every outstanding request and notification has arrived:
    the waiter table holds only listeners and every slice is back."""
    arena = manager.arena
    with trio.fail_after(timeout):
        while foreign_entries(manager) or arena.free_count != arena.n_slices:
            await trio.sleep(0.001)


def assert_quiet(manager: trio_uring.IOManager) -> None:
    arena = manager.arena
    left = foreign_entries(manager)
    assert not left, f"waiters left in the table: {left!r}"
    assert arena.free_count == arena.n_slices, (
        f"{arena.n_slices - arena.free_count} slices never came back"
    )


async def check_ring_usable(nbytes: int = 200_000, seed: int = 0) -> None:
    """A fresh stream pair on the current manager moves ``nbytes`` intact."""
    a, b = stream_pair()
    data = payload(seed, nbytes)
    got = bytearray()
    async with a, b:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def reader() -> None:
                    while True:
                        chunk = await b.receive_some()
                        if not chunk:
                            return
                        got.extend(chunk)

                nursery.start_soon(reader)
                await a.send_all(data)
                await a.send_eof()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


async def drain(stream: trio.abc.ReceiveStream, sink: bytearray | None = None) -> int:
    """Read until EOF (or a broken/closed stream); return the byte count."""
    total = 0
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while True:
            chunk = await stream.receive_some(1 << 16)
            if not chunk:
                break
            total += len(chunk)
            if sink is not None:
                sink.extend(chunk)
    return total


@contextlib.contextmanager
def fresh_features() -> Iterator[None]:
    """Drop the cached probe result on entry and restore it on exit."""
    saved = (_features._cache, _features._cache_key)
    _features._cache = None
    try:
        yield
    finally:
        _features._cache, _features._cache_key = saved


@contextlib.asynccontextmanager
async def manager(**kwargs: object) -> AsyncIterator[trio_uring.IOManager]:
    async with trio_uring.open_manager(**kwargs) as m:  # type: ignore[arg-type]
        yield m


def run_python(
    code: str, *, env: dict[str, str] | None = None, timeout: float = 60, prefix: list[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (the repo importable), capture output."""
    full_env = dict(os.environ)
    full_env.pop("TRIO_URING_DISABLE", None)
    if env:
        full_env.update(env)
    return subprocess.run(
        [*prefix, sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def _cancel_after_ticks(cs: trio.CancelScope, ticks: int) -> None:
    for _ in range(ticks):
        await trio.sleep(0)
    cs.cancel()


def plan_cancel(r: random.Random, cs: trio.CancelScope, nursery: trio.Nursery) -> str:
    """Arrange for ``cs`` to be cancelled at a seeded random point.

    ``pre``: already cancelled when the operation starts; ``ticks``: a
    sibling task cancels it after 0-30 scheduler ticks; ``time``: a deadline
    0-3 ms away.  Returns the mode, for the failure message.
    """
    mode = r.choice(("pre", "ticks", "ticks", "time", "time"))
    if mode == "pre":
        cs.cancel()
    elif mode == "ticks":
        nursery.start_soon(_cancel_after_ticks, cs, r.randrange(0, 30))
    else:
        cs.deadline = trio.current_time() + r.uniform(0, 0.003)
    return mode
