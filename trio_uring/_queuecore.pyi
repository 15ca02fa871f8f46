from collections import deque
from collections.abc import Callable, Iterable
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
    write_pos: int
    held: int
    limit: int
    on_free: Callable[[], object] | None
    def __init__(
        self,
        arena: memoryview,
        slice_size: int,
        refs: list[int],
        unsent: deque[list[Any]],
        free: list[int],
        limit: int,
        copied_total: Any = None,
    ) -> None: ...
    def write(self, data: bytes | bytearray | memoryview, pos: int = 0) -> int: ...
    def _append(self, nbytes: int) -> None: ...
    def hold(self, data: bytes) -> None: ...
    def segment_view(self, segment: list[Any]) -> bytes | memoryview: ...
    def views(self, max_segments: int) -> list[bytes | memoryview]: ...
    def _new_tail(self) -> bool: ...
    def unref(self, owner: Any) -> None: ...
    def _drop_idle_tail(self) -> None: ...
    def consume(self, nbytes: int) -> None: ...
    def release(self, segments: Iterable[list[Any]]) -> None: ...
