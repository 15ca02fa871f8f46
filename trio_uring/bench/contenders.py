"""The libraries under test: a sender and an echo server written with each.

Every contender implements the same two programs, in the idiom its library
documents, so that the measurement compares libraries and not programs:

* a *sender*: open ``streams`` connections to the sink, ``send_all`` one
  payload of ``size`` bytes again and again until ``duration`` seconds have
  passed, half-close, and wait for the sink's count of bytes received;
* an *echo server*: send back whatever arrives, until the client closes.

Contender names are ``trio`` (``trio.SocketStream``), ``zc:auto``
(``trio_uring.ZeroCopyStream`` as users get it: the library picks the
strategy and adapts it per stream), ``zc:<strategy>`` (forced to that send
strategy), ``asyncio``,
``uvloop`` and ``c:send`` / ``c:zc`` (the C reference sender, see
``csender.py``).  Python contenders run in a worker process (``worker.py``)
so that CPU time and memory are the sender's alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib.util
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

import trio_uring

from .sink import ACK_SIZE, decode_count

#: The contender every ratio is computed against.
BASELINE = "trio"
#: Contenders in table order; ``zc:*`` is expanded to the runnable strategies.
ORDER = ("trio", "zc:auto", "zc:*", "asyncio", "uvloop", "c:send", "c:zc")
#: C reference senders run one stream only (a yardstick, not an event loop).
C_CONTENDERS = ("c:send", "c:zc")


@dataclasses.dataclass(frozen=True)
class SendResult:
    """One sender measurement: what was sent and what the sink counted."""

    messages: int
    bytes_sent: int
    bytes_received: int
    elapsed: float
    cpu: float
    enter_calls: int = 0
    notifications: int = 0
    notifications_copied: int = 0
    #: Bytes copied in user space into registered memory (trio_uring only).
    bytes_copied: int = 0
    rss_start_kib: int = 0
    rss_end_kib: int = 0


def rss_kib() -> int:
    """Resident set size of this process, from /proc (0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def runnable_strategies() -> list[str]:
    """The ZeroCopyStream send strategies this kernel can run, best first."""

    async def probe(strategy: str) -> bool:
        try:
            async with trio_uring.open_manager(strategy=strategy):
                return True
        except (ValueError, OSError):
            return False

    return [s for s in trio_uring.STRATEGIES if trio.run(probe, s)]


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def is_zero_copy(name: str) -> bool:
    return name.startswith("zc:")


def strategy_of(name: str) -> str | None:
    """The strategy to force for ``name``; None for ``zc:auto``, the library's
    own choice (which also adapts per stream, as users get it)."""
    strategy = name.split(":", 1)[1]
    return None if strategy == "auto" else strategy


# -- trio and trio_uring ------------------------------------------------------


async def read_ack(stream: trio.abc.ReceiveStream) -> int:
    """The sink's byte count, sent once it has seen the end of stream."""
    ack = b""
    while len(ack) < ACK_SIZE:
        data = await stream.receive_some(ACK_SIZE - len(ack))
        if not data:
            raise ConnectionError("the sink closed without sending its count")
        ack += data
    return decode_count(ack)


async def trio_send(
    open_stream: Callable[[str, int], Awaitable[Any]],
    host: str,
    port: int,
    size: int,
    duration: float,
    streams: int,
    enter_calls: Callable[[], int],
) -> SendResult:
    """The sender, written with trio streams (``SocketStream`` or ``ZeroCopyStream``)."""
    payload = b"x" * size
    conns = [await open_stream(host, port) for _ in range(streams)]
    messages = [0] * streams
    received = [0] * streams
    rss0, enters0 = rss_kib(), enter_calls()
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + duration

    async def one(i: int, stream: Any) -> None:
        send_all = stream.send_all
        clock = time.perf_counter
        n = 0
        while True:
            await send_all(payload)
            n += 1
            if clock() >= deadline:
                break
        await stream.send_eof()
        received[i] = await read_ack(stream)
        messages[i] = n

    async with trio.open_nursery() as nursery:
        for i, stream in enumerate(conns):
            nursery.start_soon(one, i, stream)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    result = SendResult(
        messages=sum(messages),
        bytes_sent=sum(messages) * size,
        bytes_received=sum(received),
        elapsed=elapsed,
        cpu=cpu,
        enter_calls=enter_calls() - enters0,
        rss_start_kib=rss0,
        rss_end_kib=rss_kib(),
    )
    for stream in conns:
        if isinstance(stream, trio_uring.ZeroCopyStream):
            st = stream.stats()
            result = dataclasses.replace(
                result,
                notifications=result.notifications + st.notifications,
                notifications_copied=result.notifications_copied + st.notifications_copied,
            )
        await stream.aclose()
    return result


#: Scenario f: registered content for the messages 100 subscribers hold at once.
FANOUT_CONTENT_SIZE = 32 * 1024 * 1024


async def trio_fanout(
    open_stream: Callable[[str, int], Awaitable[Any]],
    host: str,
    port: int,
    size: int,
    duration: float,
    subscribers: int,
    manager: trio_uring.IOManager | None,
) -> SendResult:
    """One publisher task sends each message to every subscriber in turn.

    With trio (``manager`` None) each ``send_all`` gets the same ``bytes``;
    with trio_uring each message is registered once and every subscriber
    gets the handle.  ``messages`` counts published messages; the bytes
    are those delivered to all subscribers.
    """
    payload = b"f" * size
    conns = [await open_stream(host, port) for _ in range(subscribers)]
    rss0 = rss_kib()
    enters0 = int(manager.stats()["io_uring_enter_calls"]) if manager else 0  # type: ignore[call-overload]
    copied0 = int(manager.stats()["bytes_copied"]) if manager else 0  # type: ignore[call-overload]
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + duration
    published = 0
    while time.perf_counter() < deadline:
        if manager is None:
            for stream in conns:
                await stream.send_all(payload)
        else:
            while True:
                try:
                    message = manager.register(payload)
                    break
                except trio_uring.ContentFullError:
                    # Every registered message is still being sent: wait for one.
                    await trio.sleep(0.001)
            with message:
                for stream in conns:
                    await stream.send_all(message)
        published += 1
    received = []
    for stream in conns:
        await stream.send_eof()
        received.append(await read_ack(stream))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    notifications = notifications_copied = 0
    for stream in conns:
        if isinstance(stream, trio_uring.ZeroCopyStream):
            st = stream.stats()
            notifications += st.notifications
            notifications_copied += st.notifications_copied
        await stream.aclose()
    return SendResult(
        messages=published,
        bytes_sent=published * size * subscribers,
        bytes_received=sum(received),
        elapsed=elapsed,
        cpu=cpu,
        enter_calls=int(manager.stats()["io_uring_enter_calls"]) - enters0 if manager else 0,  # type: ignore[call-overload]
        bytes_copied=int(manager.stats()["bytes_copied"]) - copied0 if manager else 0,  # type: ignore[call-overload]
        notifications=notifications,
        notifications_copied=notifications_copied,
        rss_start_kib=rss0,
        rss_end_kib=rss_kib(),
    )


async def _echo_handler(stream: Any) -> None:
    try:
        async for data in stream:
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def trio_echo_server(
    serve: Callable[..., Awaitable[Any]], host: str, ready: Callable[[int], None]
) -> None:
    """The echo server, written with ``trio.serve_tcp`` or ``trio_uring.serve_tcp``."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(serve, _echo_handler, 0, host=host))
        ready(listeners[0].socket.getsockname()[1])


# -- asyncio and uvloop -----------------------------------------------------


async def asyncio_send(
    host: str, port: int, size: int, duration: float, streams: int
) -> SendResult:
    """The sender, written with asyncio streams (``write`` then ``drain``)."""
    payload = b"x" * size
    conns = [await asyncio.open_connection(host, port) for _ in range(streams)]
    messages = [0] * streams
    received = [0] * streams
    rss0 = rss_kib()
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + duration

    async def one(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        write, drain, clock = writer.write, writer.drain, time.perf_counter
        n = 0
        while True:
            write(payload)
            await drain()
            n += 1
            if clock() >= deadline:
                break
        writer.write_eof()
        received[i] = decode_count(await reader.readexactly(ACK_SIZE))
        messages[i] = n

    await asyncio.gather(*(one(i, r, w) for i, (r, w) in enumerate(conns)))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    for _, writer in conns:
        writer.close()
        await writer.wait_closed()
    return SendResult(
        messages=sum(messages),
        bytes_sent=sum(messages) * size,
        bytes_received=sum(received),
        elapsed=elapsed,
        cpu=cpu,
        rss_start_kib=rss0,
        rss_end_kib=rss_kib(),
    )


async def _asyncio_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def asyncio_echo_server(host: str, ready: Callable[[int], None]) -> None:
    """The echo server, written with ``asyncio.start_server``."""
    server = await asyncio.start_server(_asyncio_echo, host, 0)
    ready(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def run_asyncio(name: str, coro: Awaitable[Any]) -> Any:
    """Run ``coro`` on the stock loop (``asyncio``) or on uvloop."""
    if name == "uvloop":
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]
