"""trio streams over io_uring, with zero-copy sends from registered memory.

``ZeroCopyStream`` is a ``trio.abc.HalfCloseableStream``; ``serve_tcp``,
``open_tcp_stream`` and ``open_tcp_listeners`` mirror trio's.  The send path
uses the best strategy the running kernel supports; ``features()`` says which.
"""

from ._buffers import ContentFullError, MemlockError
from ._content import RegisteredContent
from ._features import STRATEGIES, Features, features
from ._highlevel import (
    ZeroCopyListener,
    open_tcp_listeners,
    open_tcp_stream,
    open_unix_stream,
    serve_tcp,
)
from ._manager import (
    DEFAULT_CONTENT_SIZE,
    IOManager,
    IoUringUnavailableWarning,
    ManagerClosedError,
    current_manager,
    open_manager,
    register,
)
from ._ring import RingSetupError
from ._sendfile import FileTruncatedError
from ._stream import StreamStats, ZeroCopyStream

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_CONTENT_SIZE",
    "STRATEGIES",
    "ContentFullError",
    "Features",
    "FileTruncatedError",
    "IOManager",
    "IoUringUnavailableWarning",
    "ManagerClosedError",
    "MemlockError",
    "RegisteredContent",
    "RingSetupError",
    "StreamStats",
    "ZeroCopyListener",
    "ZeroCopyStream",
    "current_manager",
    "features",
    "open_manager",
    "open_tcp_listeners",
    "open_tcp_stream",
    "open_unix_stream",
    "register",
    "serve_tcp",
]


def _fixup_module_metadata() -> None:
    """Public names report the module users import them from, as trio's do
    (so tracebacks say ``trio_uring.MemlockError``, not a private module)."""
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("trio_uring."):
            obj.__module__ = "trio_uring"


_fixup_module_metadata()
del _fixup_module_metadata
