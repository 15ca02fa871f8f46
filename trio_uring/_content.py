"""Registered content: bytes copied once into registered memory, then sent
to any number of streams by reference.

``send_all(data)`` copies ``data`` into each stream's queue, so a message
for a hundred subscribers is copied a hundred times.  ``register(data)``
copies it once, into the arena's content region (part of the same
registered buffer as the slices), and ``send_all(handle)`` queues a
reference to those bytes instead: no copy per stream and, with zero copy,
none in the kernel either.  The memory returns to the region when the
handle is closed *and* every send that reads it has had its notification.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._buffers import RegisteredArena

if TYPE_CHECKING:
    from ._manager import IOManager


class ContentAllocation:
    """One registration's bytes in the content region, and who uses them.

    ``refs`` counts the open handle (one) and every queued or in-flight
    send of them; the bytes are freed when it reaches zero.  It is also the
    owner that the outbound queue's segments name (where arena slices are
    named by number).
    """

    __slots__ = ("arena", "closed", "length", "offset", "refs")

    def __init__(self, arena: RegisteredArena, offset: int, length: int) -> None:
        self.arena = arena
        self.offset = offset
        self.length = length
        self.refs = 1
        self.closed = False

    def ref(self) -> None:
        self.refs += 1

    def unref(self) -> None:
        self.refs -= 1
        if not self.refs and self.length:
            self.arena.content.free(self.offset, self.length)


class RegisteredContent:
    """An immutable run of registered bytes: pass it to ``send_all``.

    Made by :func:`trio_uring.register` (or ``IOManager.register``).
    Slicing with ``handle[start:stop]`` gives a handle of part of the same
    bytes, without copying.  ``close()`` (or leaving the ``with`` block)
    releases the registration: no new sends may use it, and its memory
    returns once every send already queued has been sent and notified.
    Closing any handle of a registration closes them all.
    """

    __slots__ = ("_allocation", "_length", "_offset", "manager")

    def __init__(
        self, manager: IOManager, allocation: ContentAllocation, offset: int, length: int
    ) -> None:
        self.manager = manager
        self._allocation = allocation
        self._offset = offset
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, key: slice) -> RegisteredContent:
        if not isinstance(key, slice):
            raise TypeError("RegisteredContent supports slicing only: handle[start:stop]")
        start, stop, step = key.indices(self._length)
        if step != 1:
            raise ValueError("RegisteredContent slices must be contiguous (step 1)")
        return RegisteredContent(
            self.manager, self._allocation, self._offset + start, max(0, stop - start)
        )

    @property
    def closed(self) -> bool:
        return self._allocation.closed

    def segment(self) -> tuple[int, int, ContentAllocation]:
        """(arena offset, length, allocation) for queueing; the registration
        must still be open."""
        if self._allocation.closed:
            raise ValueError("this RegisteredContent was closed; register the data again")
        return self._offset, self._length, self._allocation

    def tobytes(self) -> bytes:
        """A copy of the bytes (for checks and debugging; sending needs none)."""
        self.segment()
        return bytes(self._allocation.arena.view[self._offset : self._offset + self._length])

    def close(self) -> None:
        """Release the registration; sends already queued still go out."""
        allocation = self._allocation
        if not allocation.closed:
            allocation.closed = True
            allocation.unref()

    def __enter__(self) -> RegisteredContent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<trio_uring.RegisteredContent {self._length} bytes, {state}>"
