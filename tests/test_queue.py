"""The outbound queue and the send strategies' bookkeeping, without the kernel.

A model of the kernel drives the queue: requests take segments, complete
with short or full results, and get their notifications later, in any order
the test draws.  The model checks, at each notification, that the bytes the
request read are still the bytes that were queued: invariant 1 (no slice is
rewritten while a send that reads it waits for its notification), and
invariant 2 (bytes go out in order, each once).
"""

from __future__ import annotations

import errno
import inspect
import struct
import sys
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_uring._shim_cffi import ffi

from trio_uring import _abi
from trio_uring._buffers import ProvidedRing, RegisteredArena, decode_fixed_provided
from trio_uring._manager import SendCounters
from trio_uring._queue import OutboundQueue
from trio_uring._queuecore import QueueCore
from trio_uring._ring import Ring
from trio_uring._send import FixedProvidedBundle, FixedSingle, SendRequest, VectoredFixed


def make_queue(n_slices: int = 4, slice_size: int = 64, limit: int = 2) -> OutboundQueue:
    return OutboundQueue(RegisteredArena(n_slices * slice_size, slice_size), limit)


def queued_bytes(queue: OutboundQueue) -> bytes:
    return b"".join(bytes(queue.segment_view(s)) for s in queue.unsent)


def read_bytes(queue: OutboundQueue, segments: list[list[object]]) -> bytes:
    return b"".join(bytes(queue.segment_view(s)) for s in segments)


def assert_counts_agree(queue: OutboundQueue, in_flight: list[list[object]] = []) -> None:  # noqa: B006
    """Every count, ``held``, ``nbytes`` and the free list agree with the
    tail, the queued segments and the segments ``in_flight`` requests read."""
    arena = queue.arena
    counts = [0] * arena.n_slices
    if queue.tail >= 0:
        counts[queue.tail] += 1
    for segment in [*queue.unsent, *in_flight]:
        if isinstance(segment[2], int):  # a slice, not held bytes
            counts[segment[2]] += 1
    assert arena.refs == counts
    assert queue.nbytes == sum(s[1] for s in queue.unsent)
    held = [i for i, count in enumerate(counts) if count]
    assert queue.held == len(held)
    assert sorted(arena.free_slices + held) == list(range(arena.n_slices))


def test_small_writes_pack_into_one_segment() -> None:
    queue = make_queue()
    for i in range(10):
        assert queue.write(memoryview(bytes([i]) * 5)) == 5
    assert len(queue.unsent) == 1 and queue.nbytes == 50 and queue.held == 1
    assert queued_bytes(queue) == b"".join(bytes([i]) * 5 for i in range(10))


def test_write_stops_at_the_limit_and_resumes_where_it_stopped() -> None:
    queue = make_queue(n_slices=4, slice_size=64, limit=2)
    data = memoryview(bytes(range(200)))
    assert queue.write(data) == 128
    assert not queue.writable and queue.at_limit
    sent = queue.take(10)
    assert sum(n for _, n, _ in sent) == 128
    queue.release(sent)  # a copied send: done at its result
    assert queue.writable
    assert queue.write(data, 128) == 200
    assert queued_bytes(queue) == bytes(range(128, 200))


def test_tail_returns_to_the_arena_once_nothing_reads_it() -> None:
    queue = make_queue()
    queue.write(memoryview(b"a" * 10))
    request = queue.take(1)
    queue.write(memoryview(b"b" * 10))
    # The request still reads bytes 0-9: the new bytes go after them.
    assert queue.unsent[0][0] == request[0][0] + 10
    queue.release(request)
    assert queue.held == 1
    queue.release(queue.take(1))
    # Idle: the stream holds no slice.
    assert queue.held == 0 and queue.arena.free_count == 4
    queue.write(memoryview(b"c" * 10))
    # The slice released last comes back first (it is the one still cached).
    assert queue.unsent[0][0] == request[0][0] and queue.held == 1


def test_requeue_puts_the_rest_first_with_counts_of_its_own() -> None:
    queue = make_queue(n_slices=4, slice_size=64, limit=4)
    queue.write(memoryview(bytes(range(150))))
    request = queue.take(10)
    queue.write(memoryview(bytes(range(150, 160))))
    queue.requeue(request, 70)
    queue.release(request)  # the short request's notification
    assert queued_bytes(queue) == bytes(range(70, 160))
    queue.release(queue.take(10))
    queue.clear()
    assert queue.held == 0 and queue.arena.free_count == 4 and set(queue.refs) == {0}


def test_consume_frees_slices_a_plain_send_copied() -> None:
    freed = []
    queue = OutboundQueue(RegisteredArena(4 * 64, 64), 4, lambda: freed.append(1))
    queue.write(memoryview(bytes(200)))
    queue.consume(130)
    assert len(freed) == 2 and queue.nbytes == 70
    assert queue.unsent[0][0] % 64 == 2  # 130 = two slices and 2 bytes


def test_reserve_and_commit_append_in_place() -> None:
    queue = make_queue()
    queue.write(memoryview(b"head"))
    view = queue.reserve(6)
    assert view is not None
    view[:] = b"placed"
    view.release()
    queue.commit(6)
    assert queued_bytes(queue) == b"headplaced" and len(queue.unsent) == 1


def test_a_retired_tail_never_returns_to_the_arena() -> None:
    queue = make_queue(limit=2)
    assert queue.reserve(10) is not None
    queue.retire_tail()
    assert queue.held == 0 and queue.arena.free_count == 3
    queue.write(memoryview(b"x"))
    queue.clear()
    assert queue.arena.free_count == 3


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_model_kernel_never_sees_rewritten_or_reordered_bytes(data: st.DataObject) -> None:
    queue = make_queue(n_slices=6, slice_size=32, limit=data.draw(st.integers(1, 6)))
    written = bytearray()
    wire = bytearray()
    # Requests whose bytes were sent and whose notification is outstanding,
    # with the bytes they read as they were when sent.
    awaiting: list[tuple[list[list[int]], bytes]] = []
    counter = 0
    for _ in range(data.draw(st.integers(1, 60))):
        action = data.draw(st.sampled_from(["write", "hold", "send", "copy", "notify"]))
        if action in ("write", "hold"):
            n = data.draw(st.integers(1, 80))
            chunk = bytes((counter + i) % 251 for i in range(n))
            counter += n
            if action == "hold":
                queue.hold(chunk)  # by reference, in order with the copies
                pos = n
            else:
                pos = queue.write(memoryview(chunk))
            written += chunk[:pos]
            assert queue.held <= queue.limit
        elif action == "send" and queue.nbytes:
            segments = queue.take(data.draw(st.integers(1, 4)))
            read = read_bytes(queue, segments)
            sent = data.draw(st.integers(0, len(read)))
            wire += read[:sent]
            if sent < len(read):
                queue.requeue(segments, sent)
            awaiting.append((segments, read))
        elif action == "copy" and queue.nbytes:
            # A plain send: the kernel copied the front of the queue at once.
            sent = data.draw(st.integers(0, queue.nbytes))
            wire += queued_bytes(queue)[:sent]
            queue.consume(sent)
        elif action == "notify" and awaiting:
            segments, read = awaiting.pop(data.draw(st.integers(0, len(awaiting) - 1)))
            now = read_bytes(queue, segments)
            assert now == read, "a slice was rewritten before its notification"
            queue.release(segments)
    assert bytes(wire) == bytes(written[: len(wire)])
    assert bytes(written[len(wire) :]) == queued_bytes(queue)
    for segments, read in awaiting:
        now = read_bytes(queue, segments)
        assert now == read, "a slice was rewritten before its notification"
        queue.release(segments)
    queue.clear()
    assert queue.held == 0 and queue.arena.free_count == 6 and set(queue.refs) == {0}


def queue_with_held_bytes() -> tuple[OutboundQueue, bytes]:
    """A queue of 64-byte slices with 10 copied bytes, 100 held ones and 10
    copied ones; the held object comes back too, for checks that it is sent
    by reference."""
    queue = make_queue(slice_size=64)
    held = b"h" * 100
    queue.write(memoryview(b"a" * 10))
    queue.hold(held)
    queue.write(memoryview(b"b" * 10))
    return queue, held


def test_held_bytes_queue_by_reference_in_order_with_copies() -> None:
    queue, held = queue_with_held_bytes()
    assert queue.nbytes == 120 and queue.held == 1  # held bytes take no slice
    assert [s[1] for s in queue.unsent] == [10, 100, 10]
    assert queue.unsent[1][2] is held and queue.segment_view(queue.unsent[1]) is held
    assert queued_bytes(queue) == b"a" * 10 + held + b"b" * 10
    queue.consume(30)  # a plain send took the copy and part of the held bytes
    assert queue.unsent[0][:2] == [20, 80]
    assert bytes(queue.segment_view(queue.unsent[0])) == held[20:]
    segments = queue.take(2)
    queue.requeue(segments, 50)  # a request sent 50 of the 90 bytes
    assert queued_bytes(queue) == held[70:] + b"b" * 10
    queue.release(segments)
    queue.consume(queue.nbytes)
    assert queue.nbytes == 0 and queue.held == 0 and set(queue.refs) == {0}


def test_views_name_the_front_segments_for_one_sendmsg() -> None:
    queue, held = queue_with_held_bytes()
    views = queue.views(_abi.UIO_MAXIOV)
    assert [bytes(v) for v in views] == [b"a" * 10, held, b"b" * 10]
    assert views[1] is held  # all of a held object: no view made
    assert [bytes(v) for v in queue.views(2)] == [b"a" * 10, held]
    assert queue.views(0) == []
    queue.consume(30)
    assert [bytes(v) for v in queue.views(1)] == [held[20:]]
    assert queue.nbytes == 90  # naming bytes takes none of them
    queue.unsent.append([0, 1])
    with pytest.raises(TypeError, match="segment is a list"):
        queue.views(10)


def test_copies_are_counted_per_queue_and_per_arena_and_held_bytes_are_not() -> None:
    arena = RegisteredArena(8 * 64, 64)
    first, second = OutboundQueue(arena, 4), OutboundQueue(arena, 4)
    assert first.write(memoryview(b"a" * 100)) == 100
    first.hold(b"h" * 1000)
    assert second.write(b"b" * 30, 10) == 30
    assert (first.copied, second.copied, arena.copied[0]) == (100, 20, 120)
    with pytest.raises(TypeError, match="bytes, not bytearray"):
        first.hold(bytearray(b"mutable"))  # type: ignore[arg-type]
    assert first.nbytes == 1100


def test_held_bytes_are_sent_from_their_own_address() -> None:
    queue = make_queue()
    held = bytes(range(200))
    queue.write(memoryview(b"x" * 8))
    queue.hold(held)
    copied, by_reference = queue.take(2)
    assert queue.segment_address(copied) == queue.arena.base + copied[0]
    address = queue.segment_address(by_reference)
    assert ffi.buffer(ffi.cast("char *", address), len(held))[:] == held
    by_reference[0] += 50
    assert queue.segment_address(by_reference) == address + 50


class FakeRing:
    """Records what a strategy prepares instead of submitting it."""

    def __init__(self) -> None:
        self.sqes: list[tuple[object, int, dict[str, int]]] = []

    def start(self, entry: object, opcode: int, fd: int, *fields: int, **named: int) -> int:
        """Ring.start's fields by name, however the prep passed them."""
        bound = inspect.signature(Ring.start).bind(self, entry, opcode, fd, *fields, **named)
        bound.apply_defaults()
        sqe = {k: v for k, v in bound.arguments.items() if k not in ("self", "entry", "opcode")}
        self.sqes.append((entry, opcode, sqe))
        return len(self.sqes)


class FakeStream:
    """The parts of a ZeroCopyStream a strategy and its requests use."""

    fd, bgid = 3, 7

    def __init__(self) -> None:
        arena = RegisteredArena(4 * 1024, 1024)
        self.manager = type("Manager", (), {"arena": arena, "ring": FakeRing()})()
        self.queue = OutboundQueue(arena, 4)
        self.provided_ring = ProvidedRing(4, fixed=True)
        self.counters = SendCounters()
        self.unpublished_head = False
        self.in_flight: SendRequest | None = None

    def begin(self, request: SendRequest) -> None:
        self.in_flight = request

    def send_completed(self, request: SendRequest, res: int) -> None:
        self.in_flight = None
        self.counters.sent(res)
        if res < request.nbytes:
            self.queue.requeue(request.segments, res)

    def notified(self, copied: bool) -> None:
        self.counters.notified(copied)


def test_bundle_sqe_and_entries() -> None:
    """The SQE the seed-patchset strategy submits, and the entries it picks."""
    stream = FakeStream()
    stream.queue.write(memoryview(bytes(1500)))
    FixedProvidedBundle().flush(stream)  # type: ignore[arg-type]
    ((_, opcode, sqe),) = stream.manager.ring.sqes
    assert opcode == _abi.IORING_OP_SEND_ZC
    assert sqe["sqe_flags"] == _abi.IOSQE_BUFFER_SELECT
    assert sqe["ioprio"] == (
        _abi.IORING_RECVSEND_FIXED_BUF
        | _abi.IORING_RECVSEND_BUNDLE
        | _abi.IORING_SEND_ZC_REPORT_USAGE
    )
    assert sqe["buf_index"] == 7  # the buffer group, in the buf_group union
    assert sqe["addr"] == 0 and sqe["length"] == 0  # the kernel picks the entries
    ring = stream.provided_ring
    published = [struct.unpack_from("<QIH", ring.memory, i * 16) for i in range(ring.published)]
    assert [(decode_fixed_provided(a), n, bid) for a, n, bid in published] == [
        ((0, 0), 1024, 0),
        ((0, 1024), 476, 1),
    ]


def test_short_bundle_send_finishes_the_partial_entry_before_the_rest() -> None:
    """After a short bundle send the partly sent entry goes out alone (the
    kernel consumed it), then the untouched entries, which stay published:
    each byte once and in order."""
    stream = FakeStream()
    strategy = FixedProvidedBundle()
    for i in range(3):
        stream.queue.write(memoryview(bytes([i]) * 1000))
    # Entries of 1024, 1024 and 952 bytes.  Bundle: 1500 bytes, the first
    # entry and part of the second; then that entry's rest; then the last.
    results = iter([1500, 548, 952])
    wire = bytearray()
    while stream.queue.nbytes:
        strategy.flush(stream)  # type: ignore[arg-type]
        request, _, sqe = stream.manager.ring.sqes[-1]
        assert isinstance(request, SendRequest)
        res = next(results)
        read = b"".join(bytes(stream.queue.view[o : o + n]) for o, n, _ in request.segments)
        wire += read[:res]
        kind = "bundle" if sqe["sqe_flags"] & _abi.IOSQE_BUFFER_SELECT else "single"
        if kind == "single":
            assert sqe["addr"] == stream.manager.arena.base + request.segments[0][0]
        request.complete(res, _abi.IORING_CQE_F_MORE)
        request.complete(0, _abi.IORING_CQE_F_NOTIF)
    kinds = [
        "bundle" if sqe["sqe_flags"] & _abi.IOSQE_BUFFER_SELECT else "single"
        for _, _, sqe in stream.manager.ring.sqes
    ]
    assert kinds == ["bundle", "single", "bundle"]
    assert bytes(wire) == b"".join(bytes([i]) * 1000 for i in range(3))
    assert stream.provided_ring.published == 0
    assert stream.counters.bytes == 3000 and stream.counters.notifications == 3
    stream.queue.clear()
    assert stream.queue.held == 0


@pytest.mark.parametrize("flags", [0, _abi.IORING_CQE_F_MORE])
def test_request_releases_at_result_only_without_a_notification_to_come(flags: int) -> None:
    stream = FakeStream()
    stream.queue.write(memoryview(bytes(100)))
    request = SendRequest(stream, stream.queue.take(1))  # type: ignore[arg-type]
    stream.queue.clear()
    assert stream.queue.held == 1
    done = request.complete(100, flags)
    assert done == (not flags)
    assert stream.queue.held == (1 if flags else 0)


def test_write_takes_any_contiguous_buffer_and_a_start_position() -> None:
    queue = make_queue(limit=4)
    assert queue.write(b"abcdef", 2) == 6
    assert queue.write(bytearray(b"gh")) == 2
    assert queue.write(memoryview(b"-ijk")[1:]) == 3
    assert queued_bytes(queue) == b"cdefghijk" and queue.nbytes == 9
    with pytest.raises(BufferError):
        queue.write(memoryview(b"abcdef")[::2])
    with pytest.raises(ValueError, match="position"):
        queue.write(b"abc", 4)
    with pytest.raises(TypeError):
        queue.write("text")  # type: ignore[arg-type]
    assert queue.nbytes == 9


def test_write_crosses_slices_through_new_tail() -> None:
    queue = make_queue(n_slices=4, slice_size=64, limit=4)
    data = bytes(range(256))
    assert queue.write(data) == 256
    assert queue.held == 4 and queued_bytes(queue) == data
    # One segment per slice, each counted once by its segment (and the
    # last once more as the tail).
    assert [n for _, n, _ in queue.unsent] == [64] * 4
    assert sorted(queue.refs) == [1, 1, 1, 2]


def test_a_slice_a_queue_lets_go_of_goes_back_to_the_arena() -> None:
    arena = RegisteredArena(2 * 64, 64)
    queue = OutboundQueue(arena, 2)
    assert queue.write(bytes(128)) == 128 and arena.free_count == 0
    assert not queue.writable and not arena.available
    first = queue.take(1)  # the full first slice; the second is the tail
    queue.release(first)
    assert arena.free_slices == [first[0][2]] and queue.held == 1
    queue.consume(queue.nbytes)
    assert queue.held == 0 and arena.free_count == 2 and set(queue.refs) == {0}


def test_on_free_hears_of_every_slice_returned_and_every_release() -> None:
    queue = make_queue(n_slices=4, slice_size=64, limit=4)
    calls: list[int] = []
    queue.on_free = lambda: calls.append(queue.held)
    queue.write(bytes(100))
    segments = queue.take(10)
    queue.release(segments)
    # The full first slice, then the idle tail, went back; then the release itself.
    assert calls == [1, 0, 0]
    queue.on_free = None
    queue.write(bytes(10))
    queue.consume(10)
    assert calls == [1, 0, 0] and queue.held == 0


def test_miscounted_slices_and_bytes_raise_instead_of_corrupting_the_counts() -> None:
    queue = make_queue()
    queue.write(b"abc")
    with pytest.raises(ValueError, match="more bytes than are queued"):
        queue.consume(4)
    slice_id = queue.tail
    queue.consume(3)  # the idle tail went back to the arena with them
    assert queue.refs[slice_id] == 0 and queue.held == 0
    with pytest.raises(RuntimeError, match="released more often"):
        queue.unref(slice_id)
    with pytest.raises(IndexError):
        queue.unref(99)


# consume() goes on past the first error, to the idle tail, and meets the
# same count again: that second error is reported as unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_negative_count_raises_instead_of_failing_without_an_exception() -> None:
    for use in (lambda q: q.unref(q.tail), lambda q: q.consume(3)):
        queue = make_queue()
        queue.write(b"abc")
        queue.refs[queue.tail] = -2  # corrupted from outside
        with pytest.raises(RuntimeError, match="negative count"):
            use(queue)


def test_a_commit_into_a_cleared_queue_is_refused_and_the_reservation_stands() -> None:
    """The kernel failed queued bytes while a reservation was being filled:
    the cleared queue refuses the bytes, and giving the reservation up
    returns every slice to the arena."""
    queue = make_queue()
    queue.write(b"headers")
    view = queue.reserve(16)
    assert view is not None
    view.release()
    queue.clear()
    with pytest.raises(RuntimeError, match="no tail slice"):
        queue.commit(16)
    assert not queue.unsent and queue.nbytes == 0
    queue.unreserve()
    assert queue.held == 0 and queue.arena.free_count == queue.arena.n_slices


def test_a_commit_larger_than_the_room_left_in_the_tail_is_refused() -> None:
    queue = make_queue(slice_size=64)
    view = queue.reserve(8)
    assert view is not None
    view.release()
    with pytest.raises(ValueError, match="do not lie in the tail slice"):
        queue.commit(100)
    with pytest.raises(ValueError, match="do not lie in the tail slice"):
        queue.commit(-1)
    assert not queue.unsent and queue.fill == 0
    queue.commit(8)
    queue.write(b"abc")
    assert queue.nbytes == 11 and [s[:2] for s in queue.unsent] == [[0, 11]]


def test_slices_whose_total_size_overflows_are_refused() -> None:
    """n_slices * slice_size past sys.maxsize must not wrap around to a size
    that fits the arena: slice 1 would then start 2**63 - 8 bytes into a
    16-byte arena, and write() would copy there."""
    with pytest.raises(ValueError, match="smaller than its slices"):
        QueueCore(bytearray(16), sys.maxsize - 7, [0, 0], deque(), [1], 2)
    with pytest.raises(ValueError, match="smaller than its slices"):
        QueueCore(bytearray(16), 2**62, [0] * 4, deque(), [3, 2, 1, 0], 4)
    exact = QueueCore(bytearray(16), 8, [0, 0], deque(), [1, 0], 2)
    assert exact.write(bytes(range(16))) == 16


@pytest.mark.parametrize(
    ("field", "value"), [("tail_offset", sys.maxsize - 8), ("fill", -sys.maxsize)]
)
def test_a_tail_set_outside_the_arena_is_refused_not_written(field: str, value: int) -> None:
    """tail_offset and fill are writable: a value whose sum with the copy's
    length wraps around past sys.maxsize must not pass the bounds check."""
    queue = make_queue()
    queue.write(b"a")
    setattr(queue, field, value)
    with pytest.raises(IndexError, match="tail outside the arena"):
        queue.write(b"x" * 20)
    assert queue.nbytes == 1


def test_a_write_that_runs_out_of_memory_part_way_says_how_far_it_got() -> None:
    """Each slice's worth is queued whole or not at all, and ``write_pos``
    tells the caller how much of a write that raised was queued: fail each
    allocation the write makes, one at a time."""
    testcapi = pytest.importorskip("_testcapi")
    data = bytes(range(256)) * 20
    outcomes = set()
    for failing in range(60):
        queue = make_queue(n_slices=8, slice_size=1024, limit=8)
        # Requests in flight count the tail past CPython's cached small ints:
        # counting one more segment then allocates too.
        in_flight: list[list[object]] = []
        for _ in range(300):
            queue.write(b"a")
            in_flight += queue.take(1)
        copied = queue.copied
        testcapi.set_nomemory(failing, failing + 1)
        try:
            pos = queue.write(data)
            raised = False
        except MemoryError:
            raised = True
        finally:
            testcapi.remove_mem_hooks()
        if raised:
            pos = queue.write_pos
        assert pos == queue.write_pos == queue.copied - copied == queue.nbytes
        assert queued_bytes(queue) == data[:pos]
        assert_counts_agree(queue, in_flight)
        outcomes.add((raised, 0 < pos < len(data)))
    assert (True, True) in outcomes and (False, False) in outcomes


def test_an_on_free_that_raises_in_write_leaves_nothing_of_it_queued() -> None:
    """write() calls on_free only for a full tail nothing reads any more,
    before it copies anything; what it leaves behind must be consistent."""
    queue = make_queue(n_slices=4, slice_size=64, limit=4)
    queue.write(bytes(64))  # the tail is full
    queue.hold(b"held")
    queue.consume(64)  # bytes still queued: the full tail stays, counted once
    tail = queue.tail

    def refuse() -> None:
        raise KeyboardInterrupt

    queue.on_free = refuse
    with pytest.raises(KeyboardInterrupt):
        queue.write(b"abc")
    assert queue.write_pos == 0 and queue.nbytes == len(b"held")
    assert queue.tail == -1 and queue.arena.free_slices[-1] == tail
    assert_counts_agree(queue)
    queue.on_free = None
    assert queue.write(b"abc") == 3


class RaisesOnce:
    """A callback (on_free, or a content allocation's unref) that raises the
    first time it runs, as a KeyboardInterrupt arriving in it would."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == 1:
            raise KeyboardInterrupt

    def ref(self) -> None:
        pass

    def unref(self) -> None:
        self()


@pytest.mark.parametrize("callback", ["on_free", "content"])
@pytest.mark.parametrize("done_by", ["consume", "release", "clear"])
def test_a_callback_that_raises_midway_leaves_no_count_behind(callback: str, done_by: str) -> None:
    """consume, release and clear drop many counts, calling Python on the
    way: the first slice back calls on_free, and registered content its own
    unref.  One that raises must not stop the rest: the counts after it
    would never be dropped (the slices never come back), or bytes the
    kernel took would stay queued to be sent again."""
    queue = make_queue(n_slices=4, slice_size=64, limit=4)
    raises = RaisesOnce()
    queue.write(bytes(64))  # a full slice: back to the arena once sent
    if callback == "content":
        queue.append_content(0, 8, raises)
    else:
        queue.on_free = raises
    queue.write(bytes(10))  # the tail
    nbytes = queue.nbytes
    with pytest.raises(KeyboardInterrupt):
        if done_by == "consume":
            queue.consume(nbytes)
        elif done_by == "release":
            queue.release(queue.take(10))
        else:
            queue.clear()
    assert raises.calls >= 1
    assert not queue.unsent and queue.nbytes == 0 and queue.tail == -1
    assert queue.held == 0 and queue.arena.free_count == 4
    assert_counts_agree(queue)


class FailingRing(FakeRing):
    def start(self, entry: object, opcode: int, fd: int, *fields: int, **named: int) -> int:
        raise OSError(errno.ENOMEM, "no room to stage the SQE")


@pytest.mark.parametrize("strategy", [VectoredFixed(), FixedSingle(), FixedProvidedBundle()])
def test_a_flush_that_fails_gives_back_the_segments_it_took(strategy: object) -> None:
    """The stream fails when a flush raises, and clearing its queue reaches
    only what is still queued: the segments the flush took are released
    by the flush, or their slices never return to the arena."""
    stream = FakeStream()
    stream.manager.ring = FailingRing()
    stream.fill_msghdr = lambda segments: 0  # type: ignore[attr-defined]
    stream.queue.write(memoryview(bytes(1500)))
    with pytest.raises(OSError):
        strategy.flush(stream)  # type: ignore[attr-defined]
    assert stream.in_flight is None
    stream.queue.clear()  # what the stream's fail() does
    arena = stream.manager.arena
    assert stream.queue.held == 0 and arena.free_count == arena.n_slices
