"""The outbound queue of one stream: bytes accepted by ``send_all`` and not
yet handed to the kernel, held in registered slices.

Pure bookkeeping, like ``_buffers``: nothing here waits, talks to trio or
enters the kernel, so every rule can be tested without a socket.

A queue owns a *tail* slice that small messages are appended to, so that
many of them pack densely into one slice and go out in one request.  Once
everything in the tail has been sent and the kernel let go of it, the tail
goes back to the arena: an idle stream holds no slice, so ten thousand
mostly idle connections can share an arena of a few hundred slices.  Queued
bytes are a sequence of *segments* ``[offset, length, slice]``: a run of
bytes at ``offset`` in the arena, inside ``slice``.  A send request takes
segments from the front; a short send puts what is left back in front.

Reuse is gated by reference counts kept in the arena (``arena.refs``): a
slice is counted once while it is the tail, once for every queued segment in
it, and once for every request in flight that reads it.  Only when its count
reaches zero does it return to the arena; for zero-copy sends a request
drops its counts when the kernel's notification arrives, never at the send
result.  Appending to the tail past the bytes a request reads never changes
them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from ._buffers import RegisteredArena
from ._queuecore import QueueCore
from ._shim_cffi import ffi

#: A queued run of bytes: ``[offset, length, owner]`` (mutable, so
#: appending to the tail extends the last segment in place).  The owner is
#: the slice id or the ``ContentAllocation`` of registered content (the
#: offset is then an arena offset), or a caller's ``bytes`` held by
#: reference (an offset into them; see ``hold``).
Segment = list[Any]


class OutboundQueue(QueueCore):
    """Queued bytes of one stream, in at most ``limit`` slices of ``arena``.

    ``on_free`` is called whenever this queue may have gained room: a slice
    it held went back to the arena, or a request let go of its slices (the
    tail may then be rewound).
    """

    __slots__ = ("arena", "byte_limit", "reserved", "view")

    def __init__(
        self, arena: RegisteredArena, limit: int, on_free: Callable[[], None] | None = None
    ) -> None:
        super().__init__(
            arena.view,
            arena.slice_size,
            arena.refs,
            deque(),
            arena.free_slices,
            limit,
            arena.copied,
        )
        self.arena = arena
        self.view = arena.view
        #: The share in bytes: what bytes that take no slice (held by
        #: reference, registered content) may queue before ``send_all`` waits.
        self.byte_limit = limit * arena.slice_size
        self.on_free = on_free
        #: The slice ``reserve`` counted once more, until commit or unreserve.
        self.reserved = -1

    # -- in C ---------------------------------------------------------------------
    # ``QueueCore`` has what runs for every queued message or every slice:
    #
    # - ``write(data, pos=0)``: copy ``data[pos:]`` into the queue as far as it
    #   fits without waiting for a slice; return the position reached.  Each
    #   slice's worth is queued whole or not at all; when ``write`` raises
    #   (MemoryError, or ``on_free`` for the full tail it drops first),
    #   ``write_pos`` is the position it reached: ``data[pos:write_pos]``
    #   is queued.
    # - ``_append(nbytes)``: queue ``nbytes`` just written at the tail's
    #   fill point, extending the last segment when it ends there.
    # - ``hold(data)``: queue a ``bytes`` object by reference.
    # - ``_new_tail()``: drop the full tail and make a free slice the tail;
    #   False if none may be taken (the queue holds ``limit`` slices, or the
    #   arena has none).  ``write`` calls it every ``slice_size`` bytes.
    # - ``unref(owner)``: drop one count of a segment's owner: a slice (back
    #   to the arena at zero), registered content, or held bytes (nothing).
    # - ``consume(nbytes)``: the first ``nbytes`` queued bytes were copied by
    #   the kernel (a plain send): drop them, releasing slices nothing else
    #   reads.
    # - ``release(segments)``: a request that read ``segments`` is done with
    #   them.
    # - ``_drop_idle_tail()``: nothing is queued and nothing reads the tail:
    #   return it.
    #
    # ``held`` counts the slices this queue holds (tail, queued, or read by a
    # request in flight), ``limit`` the most it may hold, and ``copied`` the
    # bytes ``write`` copied (``arena.copied`` those of every queue).
    # ``on_free``, when not None, is called whenever a slice went back to the
    # arena or a request let go of its slices.
    #
    # ``hold`` is only for strategies under which the kernel copies at send
    # time: ``bytes`` are immutable and never move, so holding the object is
    # as good as a copy until the kernel has copied it, and costs nothing.

    def reserve(self, nbytes: int) -> memoryview | None:
        """A writable view of ``nbytes`` free bytes at the tail (``nbytes`` at
        most ``slice_size``), or None when that needs a slice not free now.

        The tail is counted once more until ``commit(nbytes)`` queues the
        bytes or ``unreserve()`` gives them up, so that it stays the tail.
        """
        if self.tail < 0 or self.slice_size - self.fill < nbytes:
            if not self._new_tail():
                return None
        self.reserved = self.tail
        self.refs[self.tail] += 1
        start = self.tail_offset + self.fill
        return self.view[start : start + nbytes]

    def unreserve(self) -> None:
        """Give up what ``reserve`` handed out, queueing nothing."""
        reserved, self.reserved = self.reserved, -1
        self.unref(reserved)
        self._drop_idle_tail()

    def commit(self, nbytes: int) -> None:
        """Queue ``nbytes`` written into the view ``reserve`` returned.

        Queued first, then the reservation's count dropped: if the queue
        refuses the bytes (it was cleared meanwhile), the reservation
        stands, for ``unreserve()`` to give up."""
        self._append(nbytes)
        self.refs[self.reserved] -= 1
        self.reserved = -1

    def retire_tail(self) -> None:
        """Give up the tail slice for good (something outside the library may
        still write into it): it never returns to the arena, and no longer
        counts against this queue's share."""
        self.held -= 1
        self.tail = -1
        self.fill = 0

    @property
    def writable(self) -> bool:
        """True when ``write`` can copy at least one byte without waiting."""
        if self.tail >= 0 and self.fill < self.slice_size:
            return True
        return not self.at_limit and self.arena.available

    @property
    def at_limit(self) -> bool:
        """True when this queue may take no further slice (its share is used)."""
        return self.held - (self.tail >= 0 and self.refs[self.tail] == 1) >= self.limit

    # -- sending ----------------------------------------------------------------

    def append_content(self, offset: int, length: int, allocation: Any) -> None:
        """Queue ``length`` registered-content bytes at ``offset`` by
        reference: no copy, one more reference to ``allocation``."""
        allocation.ref()
        self.unsent.append([offset, length, allocation])
        self.nbytes += length

    def segment_address(self, segment: Segment) -> int:
        """The address of the bytes ``segment`` names, for the kernel."""
        owner = segment[2]
        if owner.__class__ is bytes:
            # The object outlives the request (its segments hold it), and
            # CPython never moves a bytes object's data.
            return int(ffi.cast("uintptr_t", ffi.from_buffer(owner))) + segment[0]
        return self.arena.base + segment[0]

    def take(self, max_segments: int) -> list[Segment]:
        """Remove up to ``max_segments`` segments from the front for a
        request; their slice counts move to the request."""
        unsent = self.unsent
        n = min(max_segments, len(unsent))
        segments = [unsent.popleft() for _ in range(n)]
        self.nbytes -= sum(s[1] for s in segments)
        return segments

    def take_run(self) -> list[Segment]:
        """Remove the segments that lie back to back in the arena at the
        front: one contiguous range, for a request that takes one address."""
        unsent = self.unsent
        first = unsent.popleft()
        run = [first]
        end = first[0] + first[1]
        nbytes = first[1]
        while unsent and unsent[0][0] == end:
            seg = unsent.popleft()
            run.append(seg)
            end += seg[1]
            nbytes += seg[1]
        self.nbytes -= nbytes
        return run

    def requeue(self, segments: list[Segment], sent: int) -> None:
        """A request that took ``segments`` sent only ``sent`` bytes: put the
        rest back in front, in order, with counts of its own (the request
        drops its counts separately)."""
        rest: list[Segment] = []
        for offset, length, slice_id in segments:
            if sent >= length:
                sent -= length
                continue
            rest.append([offset + sent, length - sent, slice_id])
            sent = 0
        refs = self.refs
        for seg in rest:
            owner = seg[2]
            if owner.__class__ is int:
                refs[owner] += 1
            elif owner.__class__ is not bytes:
                owner.ref()
        self.unsent.extendleft(reversed(rest))
        self.nbytes += sum(s[1] for s in rest)

    def clear(self) -> None:
        """Drop everything queued and the tail (the stream is closing).
        Requests in flight keep their counts until they end."""
        unsent, self.unsent = self.unsent, deque()
        self.nbytes = 0
        try:
            # release() drops every count, also past a callback that raises
            # (on_free, registered content's unref).
            self.release(unsent)
        finally:
            if self.tail >= 0:
                old, self.tail = self.tail, -1
                self.fill = 0
                self.unref(old)
