"""One publisher, many subscribers: the same payload goes to every stream.

    python examples/broadcast.py [PORT] [--subscribers N] [--messages M] [--size BYTES]
    python examples/broadcast.py --subscribe PORT [--host HOST]

The publisher waits for N subscribers (default 1), then sends M messages
(default: forever, one every ``--interval`` seconds) to every subscriber
connected at that moment, concurrently, one task per stream; a subscriber
that breaks is dropped.  PORT 0 picks a free port; the first line printed
names it.  At the end it sends EOF to everyone and prints each stream's
statistics.

A subscriber checks each message (sequence numbers in order, payload
intact) and prints a summary at EOF.  Frames are ``seq: u64, length: u32``
then ``length`` bytes derived from ``seq``.

Each message is copied once into registered memory with
``trio_uring.register`` and every subscriber's ``send_all`` queues that
handle by reference: one copy per message, not one per subscriber (the
statistics printed at the end say so).  The handle is closed as soon as the
message is queued everywhere; its memory comes back when the last send of
it is done.  Should the content region be full (slow subscribers hold many
messages), a message goes out as plain bytes, copied per subscriber.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import struct
import sys

import trio

import trio_uring

HEADER = struct.Struct("!QI")
#: Give up on a subscriber that has not taken a message within this time.
SEND_TIMEOUT = 10.0
#: Messages the content region is sized for: registered once, they stay in
#: memory until the slowest subscriber has them.
BACKLOG = 48


def payload(seq: int, size: int) -> bytes:
    seed = hashlib.sha256(seq.to_bytes(8, "little")).digest()
    return (seed * (size // len(seed) + 1))[:size]


def frame(seq: int, size: int) -> bytes:
    return HEADER.pack(seq, size) + payload(seq, size)


class Publisher:
    def __init__(self) -> None:
        self.subscribers: dict[int, trio_uring.ZeroCopyStream] = {}
        self.stats: dict[int, trio_uring.StreamStats] = {}
        self.changed = trio.Event()
        self._next_id = 0

    async def handler(self, stream: trio_uring.ZeroCopyStream) -> None:
        """serve_tcp's handler: register the stream and hold it until it closes."""
        sub_id, self._next_id = self._next_id, self._next_id + 1
        self.subscribers[sub_id] = stream
        self.changed.set()
        try:
            async with stream:
                # Subscribers send nothing; this returns at their EOF or when
                # the publisher closes the stream.
                while await stream.receive_some():
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # gone, perhaps with messages queued for it
        self.drop(sub_id)

    def drop(self, sub_id: int) -> None:
        stream = self.subscribers.pop(sub_id, None)
        if stream is not None:
            self.stats[sub_id] = stream.stats()
            self.changed.set()

    async def wait_for(self, count: int) -> None:
        while len(self.subscribers) < count:
            self.changed = trio.Event()
            await self.changed.wait()

    async def _send_one(
        self,
        sub_id: int,
        stream: trio_uring.ZeroCopyStream,
        data: trio_uring.RegisteredContent | bytes,
    ) -> None:
        try:
            with trio.fail_after(SEND_TIMEOUT):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            await trio.aclose_forcefully(stream)  # dropped: nothing more is owed to it
            self.drop(sub_id)

    async def publish(self, data: trio_uring.RegisteredContent | bytes) -> int:
        """Send ``data`` to every current subscriber at once; return how many took it."""
        targets = list(self.subscribers.items())
        async with trio.open_nursery() as nursery:
            for sub_id, stream in targets:
                nursery.start_soon(self._send_one, sub_id, stream, data)
        return sum(sub_id in self.subscribers for sub_id, _ in targets)

    async def finish(self) -> None:
        for sub_id, stream in list(self.subscribers.items()):
            try:
                await stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.drop(sub_id)


async def publish(
    port: int, host: str, subscribers: int, messages: int | None, size: int, interval: float
) -> None:
    pub = Publisher()
    # Room for the messages slow subscribers may hold back at once.
    content_size = max(trio_uring.DEFAULT_CONTENT_SIZE, BACKLOG * HEADER.size + BACKLOG * size)
    async with (
        trio_uring.open_manager(content_size=content_size) as manager,
        trio.open_nursery() as nursery,
    ):
        serve = functools.partial(trio_uring.serve_tcp, pub.handler, port, host=host)
        listeners = await nursery.start(serve)
        bound = listeners[0].socket.getsockname()[1]
        strategy = trio_uring.features().strategy
        print(f"broadcast publisher on port {bound}, send strategy {strategy}", flush=True)
        await pub.wait_for(subscribers)
        print(f"{len(pub.subscribers)} subscribers connected, publishing", flush=True)
        seq = 0
        while messages is None or seq < messages:
            await pub.wait_for(1)
            message = frame(seq, size)
            try:
                with trio_uring.register(message) as registered:
                    reached = await pub.publish(registered)
            except trio_uring.ContentFullError:
                reached = await pub.publish(message)
            if messages is None:
                print(f"message {seq}: {reached} subscribers", flush=True)
            seq += 1
            await trio.sleep(interval)
        await pub.finish()
        # Stop accepting; the handlers end as the subscribers close their side.
        nursery.cancel_scope.deadline = trio.current_time() + SEND_TIMEOUT
        while pub.subscribers:
            pub.changed = trio.Event()
            await pub.changed.wait()
        nursery.cancel_scope.cancel()
    copied = manager.stats()["bytes_copied"]
    print(f"published {seq} messages of {size} bytes, {copied} bytes copied in all")
    for sub_id, st in sorted(pub.stats.items()):
        print(
            f"subscriber {sub_id}: {st.bytes_sent} bytes in {st.sends} sends, "
            f"{st.bytes_copied} bytes copied, "
            f"{st.notifications} notifications ({st.notifications_copied} copied)"
        )


async def receive_exactly(stream: trio_uring.ZeroCopyStream, buf: bytearray, n: int) -> bytes:
    """Take ``n`` bytes from the front of ``buf``, receiving more as needed."""
    while len(buf) < n:
        data = await stream.receive_some()
        if not data:
            if buf:
                raise SystemExit(f"stream ended inside a frame ({len(buf)} of {n} bytes)")
            raise EOFError
        buf += data
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def subscribe(host: str, port: int) -> None:
    stream = await trio_uring.open_tcp_stream(host, port)
    count = total = 0
    first = expected = None
    buf = bytearray()
    async with stream:
        while True:
            try:
                seq, length = HEADER.unpack(await receive_exactly(stream, buf, HEADER.size))
            except EOFError:
                break
            body = await receive_exactly(stream, buf, length)
            if expected is not None and seq != expected:
                raise SystemExit(f"message {seq} arrived, expected {expected}")
            if body != payload(seq, length):
                raise SystemExit(f"message {seq} is corrupted")
            if first is None:
                first = seq
            expected = seq + 1
            count += 1
            total += length
    print(f"received {count} messages ({total} bytes), first {first}, all intact", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", nargs="?", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--subscribe", metavar="PORT", type=int, help="run a subscriber")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind or connect to")
    parser.add_argument("--subscribers", type=int, default=1, help="wait for this many")
    parser.add_argument("--messages", type=int, help="publish this many, then stop")
    parser.add_argument("--size", type=int, default=64 * 1024, help="payload bytes per message")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between messages")
    args = parser.parse_args()
    try:
        if args.subscribe is not None:
            trio.run(subscribe, args.host, args.subscribe)
        else:
            trio.run(
                publish,
                args.port,
                args.host,
                args.subscribers,
                args.messages,
                args.size,
                args.interval if args.messages else max(args.interval, 1.0),
            )
    except KeyboardInterrupt:
        sys.exit(130)
