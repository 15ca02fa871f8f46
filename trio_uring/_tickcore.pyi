from collections.abc import Callable
from typing import Any

class Ticker:
    tick: int
    pending: list[Any]
    def __init__(self, flush: Callable[[int, float], object]) -> None: ...
    def before_io_wait(self, timeout: float) -> None: ...
