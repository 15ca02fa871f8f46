"""Registered slices and provided-buffer rings: pure bookkeeping.

Nothing here waits or talks to trio, so every rule can be tested without a
kernel: the stream layer turns "no slice free" into a trio wait, and the ring
layer turns registration into syscalls.

The invariant this module exists to keep: a slice returns to the free list
only when every reference to it is gone.  ``RegisteredArena.refs`` counts
them; the stream's ``OutboundQueue`` (``_queue``) keeps the counts: one for
the slice being filled, one per queued run of bytes in it, one per send in
flight that reads it, dropped when that send's notification
(``IORING_CQE_F_NOTIF``) arrives or it completes without promising one.
"""

from __future__ import annotations

import array
import mmap
from collections.abc import Iterable, Sequence
from typing import Any

from . import _abi
from ._features import features
from ._shim_cffi import ffi, lib


class MemlockError(OSError):
    """Registering the arena was refused because of ``RLIMIT_MEMLOCK``."""


def fixed_provided_split(index_bits: int | None = None) -> _abi.FixedProvidedSplit:
    """The addr layout for ``index_bits`` (20 or 32); by default the probed one.

    The seed patchset's uapi is not settled: the kernel that runs decides
    how many low bits of an entry's addr are the registered buffer index, and
    an entry written for another split names other bytes.  So the default is
    what ``features()`` found this kernel to decode.
    """
    if index_bits is None:
        index_bits = features().fixed_provided_index_bits
    try:
        return _abi.FIXED_PROVIDED_SPLITS[index_bits]
    except KeyError:
        known = sorted(_abi.FIXED_PROVIDED_SPLITS)
        raise ValueError(
            f"no fixed-provided split with {index_bits} index bits; one of {known}"
        ) from None


def encode_fixed_provided(buf_index: int, offset: int, index_bits: int | None = None) -> int:
    """The addr of a fixed-provided entry: ``(offset << index_bits) | buf_index``.

    Refuses what the split cannot carry instead of truncating it: the kernel
    would read a truncated addr as another buffer or offset and send bytes
    nobody wrote there.
    """
    split = fixed_provided_split(index_bits)
    if not 0 <= buf_index <= split.max_index:
        raise ValueError(
            f"registered buffer index {buf_index} does not fit the {split.name} split "
            f"(at most {split.max_index})"
        )
    if not 0 <= offset <= split.max_offset:
        raise ValueError(
            f"offset {offset} does not fit the {split.name} split (at most {split.max_offset})"
        )
    return (offset << split.index_bits) | buf_index


def decode_fixed_provided(addr: int, index_bits: int | None = None) -> tuple[int, int]:
    """``(buf_index, offset)`` as a kernel with this split reads ``addr``."""
    split = fixed_provided_split(index_bits)
    return addr & split.max_index, addr >> split.index_bits


class ContentFullError(MemoryError):
    """Registered content does not fit in the content region."""


class ContentRegion:
    """Byte ranges of the arena's content region: first fit, merged on free.

    Registered content is copied once and then sent by reference, so its
    memory is allocated in variable sizes and freed when its last reference
    goes, in any order; ranges are aligned to 64 bytes (a cache line).
    """

    ALIGN = 64

    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self.size = size
        #: Free ranges ``[offset, length]``, sorted by offset, never adjacent.
        self._free: list[list[int]] = [[start, size]] if size else []

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self._free)

    @property
    def largest_free(self) -> int:
        return max((n for _, n in self._free), default=0)

    def allocate(self, nbytes: int) -> int:
        """The arena offset of ``nbytes`` free bytes; ``ContentFullError`` if
        no free range is large enough."""
        need = max(self.ALIGN, -(-nbytes // self.ALIGN) * self.ALIGN)
        for i, (offset, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = [offset + need, length - need]
                return offset
        raise ContentFullError(
            f"registering {nbytes} bytes of content failed: the content region has "
            f"{self.free_bytes} of its {self.size} bytes free, the largest free run "
            f"{self.largest_free}; open_manager(content_size=...) larger, or close "
            "content handles no longer needed"
        )

    def free(self, offset: int, nbytes: int) -> None:
        """Return what ``allocate(nbytes)`` gave at ``offset``."""
        length = max(self.ALIGN, -(-nbytes // self.ALIGN) * self.ALIGN)
        ranges = self._free
        i = 0
        while i < len(ranges) and ranges[i][0] < offset:
            i += 1
        ranges.insert(i, [offset, length])
        if i + 1 < len(ranges) and offset + length == ranges[i + 1][0]:
            ranges[i][1] += ranges.pop(i + 1)[1]
        if i and ranges[i - 1][0] + ranges[i - 1][1] == offset:
            ranges[i - 1][1] += ranges.pop(i)[1]


class RegisteredArena:
    """Memory registered with the ring as one fixed buffer, cut into slices.

    Slices are identified by their number, which is also the ``bid`` of the
    provided-buffer entries that carry them.  Nothing ever waits here for a
    slice: a stream that finds none free while its share has room sends
    without the arena (``ZeroCopyStream._wait_for_room``), so that streams
    holding every slice for peers that stopped reading stall no one else.
    """

    def __init__(
        self, size: int, slice_size: int, *, buf_index: int = 0, content_size: int = 0
    ) -> None:
        if not all(isinstance(n, int) for n in (size, slice_size, content_size)):
            raise TypeError("arena_size, slice_size and content_size must be ints (bytes)")
        if content_size < 0:
            raise ValueError(f"content_size must be >= 0, not {content_size}")
        if slice_size <= 0 or size < slice_size:
            raise ValueError(
                f"arena_size ({size}) must hold at least one slice of slice_size ({slice_size})"
            )
        if size + content_size > _abi.MAX_REGISTERED_BUFFER:
            raise ValueError(
                f"arena_size + content_size ({size + content_size}) exceeds the kernel's 1 GiB "
                "limit for one registered buffer"
            )
        n_slices = size // slice_size
        if n_slices > 1 << 16:
            raise ValueError(
                f"{n_slices} slices exceed the 65536 buffer ids a provided ring can name; "
                "use a larger slice_size"
            )
        self.slice_size = slice_size
        self.n_slices = n_slices
        self.size = n_slices * slice_size
        self.buf_index = buf_index
        #: Registered content lives after the slices, in the same registered
        #: buffer, so one request can carry both.
        self.content = ContentRegion(self.size, content_size)
        self.registered_size = self.size + content_size
        self.memory = mmap.mmap(-1, self.registered_size)
        self.view = memoryview(self.memory)
        self.cdata = ffi.from_buffer(self.memory)
        self.base: int = int(ffi.cast("uintptr_t", self.cdata))
        #: Free slices, taken last in first out: the slice released last is
        #: the one most likely still in the CPU's caches.  The outbound
        #: queues' C core takes from and returns to this list directly, by
        #: the same rule.
        self.free_slices: list[int] = list(range(n_slices - 1, -1, -1))
        #: References to each slice, kept by the outbound queues (``_queue``).
        self.refs = [0] * n_slices
        #: Bytes copied in user space into this memory: by the outbound
        #: queues (their C core adds to this int64 as it copies) and by
        #: ``register``.
        self.copied = array.array("q", [0])

    @property
    def free_count(self) -> int:
        return len(self.free_slices)

    @property
    def available(self) -> bool:
        """True when a slice is free."""
        return bool(self.free_slices)


class ProvidedRing:
    """A provided-buffer ring: the memory of ``struct io_uring_buf_ring``.

    ``entries`` 16-byte ``struct io_uring_buf`` records in page-aligned
    memory, the 16-bit tail overlaying ``resv`` of entry 0 and published with
    a release store.  In ``fixed`` mode an entry's addr is the fixed-provided
    encoding of (registered buffer index, offset); otherwise a plain pointer.

    Only the ``fixed-provided-bundle`` strategy publishes entries, because
    only there does the kernel read them: it consumes them itself, and
    ``advance`` keeps our head in step with what it took.  Every other
    strategy hands the kernel addresses straight from the outbound queue.
    """

    def __init__(self, entries: int, *, fixed: bool = True, index_bits: int | None = None) -> None:
        if entries < 1 or entries > _abi.MAX_BUF_RING_ENTRIES or entries & (entries - 1):
            raise ValueError("ring entries must be a power of two between 1 and 32768")
        self.entries = entries
        self.mask = entries - 1
        self.fixed = fixed
        #: The addr layout of fixed entries: the split this kernel decodes.
        self.split = fixed_provided_split(index_bits) if fixed else None
        self.memory = mmap.mmap(-1, max(mmap.PAGESIZE, entries * 16))
        self.bufs = ffi.cast("struct io_uring_buf *", ffi.from_buffer(self.memory))
        self.address: int = int(ffi.cast("uintptr_t", self.bufs))
        self.tail = 0
        self.head = 0

    @staticmethod
    def entries_for(n_slices: int) -> int:
        """The smallest valid ring size that can hold ``n_slices`` entries."""
        return 1 << max(0, (n_slices - 1).bit_length())

    @property
    def published(self) -> int:
        """Entries published and not yet consumed."""
        return self.tail - self.head

    def publish(self, arena: RegisteredArena, segments: Iterable[Sequence[Any]]) -> None:
        """Write one entry per ``(arena offset, length, slice id)`` segment,
        then release-store the new tail."""
        bufs, mask, tail, put = self.bufs, self.mask, self.tail, lib.tu_buf_ring_put
        fixed, buf_index, base = self.fixed, arena.buf_index, arena.base
        shift = 0
        if fixed:
            # Checked once for the whole arena, before any entry is written:
            # an entry the kernel cannot decode would stay at the ring head
            # and fail every later send on this buffer group.
            split = self.split
            assert split is not None
            encode_fixed_provided(buf_index, arena.registered_size - 1, split.index_bits)
            shift = split.index_bits
        for offset, length, slice_id in segments:
            if tail - self.head >= self.entries:
                raise RuntimeError("provided ring overflow: more entries published than it holds")
            addr = (offset << shift) | buf_index if fixed else base + offset
            # The bid is ours alone (nothing reads it back): registered
            # content, which has no slice number, gets 0xFFFF.
            # The entry's index within the ring: ``tail`` itself grows without
            # bound, past what the shim's 32-bit index holds.
            put(
                bufs,
                mask,
                tail & mask,
                addr,
                length,
                slice_id if slice_id.__class__ is int else 0xFFFF,
            )
            tail += 1
        self.tail = tail
        lib.tu_buf_ring_publish(bufs, tail & 0xFFFF)

    def advance(self, count: int) -> None:
        """The kernel consumed the next ``count`` published entries."""
        if count > self.published:
            raise RuntimeError("provided ring underflow: more entries consumed than published")
        self.head += count

    @property
    def published_tail(self) -> int:
        """The tail as the kernel sees it (read back from shared memory)."""
        return lib.tu_buf_ring_tail(self.bufs)
