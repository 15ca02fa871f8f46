"""Small helpers shared by the public classes."""

from __future__ import annotations

import trio


class ConflictDetector:
    """Raise ``trio.BusyResourceError`` when two tasks use one side at once.

    The same check trio's own streams make: a stream is for one sender and
    one receiver at a time, and interleaving two tasks' data would corrupt
    it silently.
    """

    __slots__ = ("_held", "_msg")

    def __init__(self, msg: str) -> None:
        self._msg = msg
        self._held = False

    @property
    def busy(self) -> bool:
        """True while a task is inside."""
        return self._held

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._msg)
        self._held = True

    def __exit__(self, *exc: object) -> None:
        self._held = False


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
