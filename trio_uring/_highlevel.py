"""Connecting, listening and serving, with trio's signatures and semantics."""

from __future__ import annotations

import contextlib
import errno
import socket as _stdlib_socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

from ._manager import IOManager, Multishot, current_manager
from ._prep import prep_accept
from ._stream import ZeroCopyStream
from ._util import ConflictDetector

_SOCKET_GONE = (
    "the socket under this ZeroCopyListener was closed; close the listener with aclose() "
    "rather than closing its socket"
)

#: accept() errors that concern only the connection being accepted; trio's
#: SocketListener skips them the same way.
_IGNORED_ACCEPT_ERRNOS = frozenset(
    e
    for e in (
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    )
)


class ZeroCopyListener(trio.abc.Listener[ZeroCopyStream]):
    """A listening socket whose ``accept`` goes through io_uring.

    Uses one multishot ACCEPT where the kernel has it, so a busy listener
    costs no syscall per connection; each accepted socket becomes a
    ``ZeroCopyStream``.
    """

    def __init__(self, socket: trio.socket.SocketType) -> None:
        if not isinstance(socket, trio.socket.SocketType):
            raise TypeError("ZeroCopyListener needs a trio socket object")
        if socket.type != _stdlib_socket.SOCK_STREAM:
            raise ValueError("ZeroCopyListener needs a SOCK_STREAM socket")
        try:
            listening = socket.getsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_ACCEPTCONN)
        except OSError:
            listening = True
        if not listening:
            raise ValueError("ZeroCopyListener needs a listening socket; call listen() first")
        self.socket = socket
        #: The fd number the accept requests name (see ``socket_lost``).
        self.fd = socket.fileno()
        self.manager: IOManager = current_manager()
        self._multishot: Multishot | None = None
        self._closed = False
        self._accept_conflict = ConflictDetector(
            "another task is currently accepting on this ZeroCopyListener"
        )

    def socket_lost(self) -> bool:
        """``SocketOwner``: whether other code closed the listening socket
        (its fd number is stale and may name another socket).  The manager
        then cancels the accept request, and ``accept`` raises
        ``ClosedResourceError`` rather than waiting forever.  False once the
        listener itself was closed (``aclose`` cancels its accept)."""
        return not self._closed and self.socket.fileno() != self.fd

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this listener was closed")
        if self.socket_lost():
            raise trio.ClosedResourceError(_SOCKET_GONE)

    async def accept(self) -> ZeroCopyStream:
        """Wait for and return the next connection (a checkpoint).

        One task accepts at a time (``trio.BusyResourceError`` otherwise),
        as with trio's own listeners.
        """
        with self._accept_conflict:
            return await self._accept()

    async def _accept(self) -> ZeroCopyStream:
        manager = self.manager
        while True:
            if self._closed:
                # A full checkpoint before the error, as trio's listeners
                # make: a pending cancellation comes first.
                await trio.lowlevel.checkpoint()
                raise trio.ClosedResourceError("this listener was closed")
            if manager.ring is None:
                try:
                    sock, _ = await self.socket.accept()
                except OSError as exc:
                    # One connection's trouble, as for trio.SocketListener:
                    # take the next one.
                    if exc.errno in _IGNORED_ACCEPT_ERRNOS:
                        continue
                    raise
                return _wrap(sock)
            if self._multishot is None or (
                self._multishot.finished and not self._multishot.results
            ):
                try:
                    self._check_open()
                    self._multishot = manager.start_multishot(
                        prep_accept,
                        self.fd,
                        _stdlib_socket.SOCK_CLOEXEC,
                        manager.features.accept_multishot,
                        ms=Multishot(discard=_stdlib_socket.close, owner=self),
                    )
                except BaseException:
                    # Nothing was waited for yet: the error, too, comes at a
                    # full checkpoint.
                    await trio.lowlevel.checkpoint()
                    raise
            res = await manager.next_result(self._multishot)
            if res is None:
                continue
            if res < 0:
                self._check_open()
                if -res in _IGNORED_ACCEPT_ERRNOS:
                    continue
                raise OSError(-res, errno.errorcode.get(-res, str(-res)))
            return _wrap(trio.socket.from_stdlib_socket(_stdlib_socket.socket(fileno=res)))

    async def aclose(self) -> None:
        """Stop accepting and close the socket; a blocked ``accept`` raises
        ``trio.ClosedResourceError``.  Connections the kernel accepted but
        nobody took are closed, not leaked.  Idempotent; a checkpoint."""
        if not self._closed:
            self._closed = True
            if self._multishot is not None:
                self.manager.close_multishot(self._multishot)
            self.socket.close()
        await trio.lowlevel.checkpoint()


async def open_tcp_stream(host: str | bytes, port: int, **kwargs: Any) -> ZeroCopyStream:
    """Connect like ``trio.open_tcp_stream`` (happy eyeballs, DNS) and wrap.

    trio's ``SocketStream`` sets ``TCP_NOTSENT_LOWAT`` to 16 KiB, so that
    its ``send_all`` leaves little unsent data in the kernel.  A
    ``ZeroCopyStream`` buffers in its own outbound queue, and the limit
    only splits its large sends into many small ones (each socket fill a
    round trip through trio's epoll): it is set back to the system's
    default, as on the streams a ``ZeroCopyListener`` accepts.
    """
    stream = await trio.open_tcp_stream(host, port, **kwargs)
    if hasattr(_stdlib_socket, "TCP_NOTSENT_LOWAT"):
        with contextlib.suppress(OSError):
            # 0: the kernel uses net.ipv4.tcp_notsent_lowat (unlimited by default).
            stream.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NOTSENT_LOWAT, 0)
    return _wrap(stream.socket)


async def open_unix_stream(path: str | bytes) -> ZeroCopyStream:
    """Connect to a Unix socket like ``trio.open_unix_socket`` and wrap."""
    stream = await trio.open_unix_socket(path)
    return _wrap(stream.socket)


def _wrap(sock: trio.socket.SocketType) -> ZeroCopyStream:
    """``ZeroCopyStream(sock)``, closing the connected socket if that fails
    (the manager shut down, no buffer group left), so it never leaks."""
    try:
        return ZeroCopyStream(sock)
    except BaseException:
        sock.close()
        raise


async def open_tcp_listeners(
    port: int,
    *,
    host: str | bytes | None = None,
    backlog: int | None = None,
    reuse_port: bool = False,
) -> list[ZeroCopyListener]:
    """Like ``trio.open_tcp_listeners``, returning ``ZeroCopyListener`` objects.

    ``reuse_port=True`` sets ``SO_REUSEPORT`` before binding, so several
    processes (one trio run and one ring each) can listen on the same port
    and the kernel spreads connections across them: the way to use every
    core, since one trio run uses one.  As trio does, an address family the
    system has no sockets for (``EAFNOSUPPORT``: IPv6 turned off, while
    ``host=None`` still resolves to ``::`` too) is skipped, unless it is
    every family the host resolves to.
    """
    if not reuse_port:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
        try:
            return [ZeroCopyListener(listener.socket) for listener in listeners]
        except BaseException:
            for listener in listeners:
                listener.socket.close()
            raise
    addresses = await trio.socket.getaddrinfo(
        host, port, type=_stdlib_socket.SOCK_STREAM, flags=_stdlib_socket.AI_PASSIVE
    )
    sockets: list[trio.socket.SocketType] = []
    unsupported: list[OSError] = []
    try:
        for family, type_, proto, _, sockaddr in addresses:
            try:
                sock = trio.socket.socket(family, type_, proto)
            except OSError as exc:
                # A family this system has no sockets for, as
                # trio.open_tcp_listeners skips it: getaddrinfo offers both
                # families on a system that has only one.
                if exc.errno != errno.EAFNOSUPPORT:
                    raise
                unsupported.append(exc)
                continue
            sockets.append(sock)
            sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_REUSEADDR, 1)
            sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_REUSEPORT, 1)
            if family == _stdlib_socket.AF_INET6:
                sock.setsockopt(_stdlib_socket.IPPROTO_IPV6, _stdlib_socket.IPV6_V6ONLY, 1)
            await sock.bind(sockaddr)
            sock.listen(0xFFFF if backlog is None else backlog)
        if unsupported and not sockets:
            msg = f"this system has sockets for none of the address families {host!r} resolves to"
            raise OSError(errno.EAFNOSUPPORT, msg) from ExceptionGroup(msg, unsupported)
        return [ZeroCopyListener(sock) for sock in sockets]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise


async def serve_tcp(
    handler: Callable[[ZeroCopyStream], Awaitable[object]],
    port: int,
    *,
    host: str | bytes | None = None,
    backlog: int | None = None,
    reuse_port: bool = False,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[list[ZeroCopyListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Like ``trio.serve_tcp``: each connection's handler gets a ``ZeroCopyStream``.

    Runs until cancelled.  ``task_status.started`` reports the listeners, so
    ``await nursery.start(serve_tcp, handler, 0)`` learns the bound port.
    ``reuse_port`` is as for ``open_tcp_listeners``.
    """
    listeners = await open_tcp_listeners(port, host=host, backlog=backlog, reuse_port=reuse_port)
    await trio.serve_listeners(
        handler, listeners, handler_nursery=handler_nursery, task_status=task_status
    )
