from collections import deque
from typing import Any

class QueueCore:
    slice_size: int
    tail: int
    tail_offset: int
    fill: int
    nbytes: int
    unsent: deque[list[Any]]
    refs: list[int]
    copied: int
    def __init__(
        self,
        arena: memoryview,
        slice_size: int,
        refs: list[int],
        unsent: deque[list[Any]],
        copied_total: Any = None,
    ) -> None: ...
    def write(self, data: bytes | bytearray | memoryview, pos: int = 0) -> int: ...
    def _append(self, start: int, nbytes: int) -> None: ...
    def hold(self, data: bytes) -> None: ...
