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
