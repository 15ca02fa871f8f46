"""Small helpers shared by the public classes."""

from __future__ import annotations

import trio


class ConflictDetector:
    """Raise ``trio.BusyResourceError`` when two tasks use one side at once.

    The same check trio's own streams make: a stream is for one sender and
    one receiver at a time, and interleaving two tasks' data would corrupt
    it silently.

    ``busy`` is a plain attribute so that a hot path may test and set it
    inline (``acquire``/``busy = False``) instead of entering a ``with``.
    """

    __slots__ = ("_msg", "busy")

    def __init__(self, msg: str) -> None:
        self._msg = msg
        #: True while a task is inside.
        self.busy = False

    def acquire(self) -> None:
        """Mark the side busy, or raise ``BusyResourceError`` if it is."""
        if self.busy:
            raise trio.BusyResourceError(self._msg)
        self.busy = True

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.busy = False


def byte_view(data: object, what: str) -> memoryview:
    """``data`` as a flat memoryview of bytes, or a clear error for ``what``."""
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{what} needs a bytes-like object (bytes, bytearray, memoryview), "
            f"not {type(data).__name__}"
        ) from None
    if not view.c_contiguous:
        raise ValueError(
            f"{what} needs a contiguous buffer; pass bytes(view) or a "
            "contiguous copy of this strided memoryview"
        )
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view
