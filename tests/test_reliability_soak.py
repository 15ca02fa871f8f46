"""Issue 5, item 7: soak.

``TRIO_URING_SOAK_SENDS`` sends (default 10^5; the issue's full size is 10^6)
over 100 streams: RSS and open fds flat after warm-up, registered memory
constant, every byte checked, zero errors.  The result is printed.
"""

from __future__ import annotations

import hashlib

import pytest
import trio
from _reliability_helpers import (
    assert_quiet,
    env_int,
    fd_count,
    rng,
    rss_bytes,
    settle,
    stream_pair,
)

import trio_uring

SENDS = env_int("TRIO_URING_SOAK_SENDS", 100_000)
STREAMS = env_int("TRIO_URING_SOAK_STREAMS", 100)
#: RSS may move by allocator noise, never by a per-send leak: 10^5 sends
#: leaking even 100 bytes each would exceed this.
RSS_SLACK = 8 << 20


@pytest.mark.slow
async def test_soak() -> None:
    per_stream = max(1, SENDS // STREAMS)
    errors: list[BaseException] = []
    digests: list[tuple[bytes, bytes]] = []
    samples: list[tuple[int, int]] = []
    done = 0
    async with trio_uring.open_manager(arena_size=1 << 20, slice_size=16 * 1024) as manager:
        registered = (manager.arena.size, manager.arena.n_slices)
        base_fds = fd_count()
        pairs = [stream_pair() for _ in range(STREAMS)]

        async def run(i: int) -> None:
            nonlocal done
            a, b = pairs[i]
            r = rng("soak", i)
            sizes = [r.choice((64, 512, 1460, 4096, 9000, 40_000)) for _ in range(per_stream)]
            block = hashlib.sha256(str(i).encode()).digest() * (40_000 // 32 + 1)
            sent, got = hashlib.sha256(), hashlib.sha256()
            try:
                async with a, b, trio.open_nursery() as nursery:

                    async def read() -> None:
                        while chunk := await b.receive_some():
                            got.update(chunk)

                    nursery.start_soon(read)
                    for k, n in enumerate(sizes):
                        data = block[k % 32 : k % 32 + n]
                        await a.send_all(data)
                        sent.update(data)
                        done += 1
                    await a.send_eof()
            except Exception as exc:
                errors.append(exc)
            digests.append((sent.digest(), got.digest()))

        async def sample() -> None:
            while True:
                samples.append((rss_bytes(), fd_count()))
                await trio.sleep(0.05)

        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                async with trio.open_nursery() as workers:
                    for i in range(STREAMS):
                        workers.start_soon(run, i)
                nursery.cancel_scope.cancel()
        await settle(manager)
        assert_quiet(manager)
        assert (manager.arena.size, manager.arena.n_slices) == registered
        stats = manager.stats()
        end_fds = fd_count()
    assert not errors, errors[:3]
    assert done == per_stream * STREAMS
    assert all(s == g for s, g in digests) and len(digests) == STREAMS
    # Flat: compare the steady state (after the first quarter) with its end.
    steady = samples[len(samples) // 4 :] or samples
    rss_growth = steady[-1][0] - min(s[0] for s in steady)
    fds = [s[1] for s in steady]
    print(
        f"soak: {done} sends over {STREAMS} streams, {stats['bytes']} bytes, "
        f"{stats['notifications']} notifications, 0 errors; RSS {steady[0][0] >> 20} -> "
        f"{steady[-1][0] >> 20} MiB (growth {rss_growth >> 10} KiB), "
        f"fds {base_fds} -> {max(fds)} -> {end_fds}, "
        f"registered {registered[0] >> 10} KiB in {registered[1]} slices"
    )
    assert rss_growth < RSS_SLACK
    # Open fds never grow past the streams' own, and all are gone at the end.
    assert max(fds) <= samples[0][1] + 2
    assert end_fds <= base_fds
