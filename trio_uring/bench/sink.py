"""The receiving end that every sender contender talks to, in Python.

The bench runs the C sink of ``csink.c`` (see ``csink.py``); this one is
the fallback where gcc is missing, and the reference for the protocol.

One sink serves every contender, in its own process, so that no contender
is measured with a faster or slower receiver than another.  Each connection
gets a thread with a tight ``recv_into`` loop into one preallocated buffer
(the received bytes are only counted); at end of stream the sink answers
with its count as 8 little-endian bytes and closes.  The sender's clock
stops when that answer arrives, so a measurement covers delivery, and the
sender can check that every byte arrived.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Iterator

from .csink import PYTHON, SinkChoice

#: Size of the receive buffer; large enough that one call drains what
#: loopback can queue, so the sink makes few calls per megabyte.
RECV_BUFFER_SIZE = 1 << 20
ACK_SIZE = 8


def drain(conn: socket.socket, buffer: bytearray) -> int:
    """Receive until end of stream, discarding the data; return the byte count."""
    view = memoryview(buffer)
    recv_into = conn.recv_into
    total = 0
    while n := recv_into(view):
        total += n
    return total


def encode_count(count: int) -> bytes:
    return count.to_bytes(ACK_SIZE, "little")


def decode_count(ack: bytes) -> int:
    if len(ack) != ACK_SIZE:
        raise ValueError(f"the sink's count is {ACK_SIZE} bytes, got {len(ack)}")
    return int.from_bytes(ack, "little")


class Sink:
    """A listening socket whose connections are drained by one thread each.

    Threads rather than an event loop: the blocking ``recv_into`` releases
    the GIL, so with one stream the sink costs one syscall per buffer-full
    and nothing else, which is what a yardstick receiver should cost.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.listener = socket.create_server((host, port), backlog=1024, reuse_port=False)
        self.port: int = self.listener.getsockname()[1]
        self.total = 0
        self.connections = 0
        self._lock = threading.Lock()

    def _serve(self, conn: socket.socket, verbose: bool) -> None:
        with conn:
            try:
                count = drain(conn, bytearray(RECV_BUFFER_SIZE))
                conn.sendall(encode_count(count))
            except OSError:
                return
        with self._lock:
            self.total += count
            self.connections += 1
        if verbose:
            print(f"connection done: {count} bytes", flush=True)

    def serve_forever(self, verbose: bool = False) -> None:
        """Accept connections until the listener is closed."""
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, verbose), daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def run_sink(port: int, host: str = "127.0.0.1", verbose: bool = False) -> None:
    """Run a sink in this process; print its port, serve until interrupted."""
    sink = Sink(host, port)
    print(f"sink listening on {host}:{sink.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        sink.serve_forever(verbose=verbose)


@contextlib.contextmanager
def sink_process(choice: SinkChoice | None = None, host: str = "127.0.0.1") -> Iterator[int]:
    """Start a sink in a child process; yield its port, stop it on exit.

    ``choice`` says which sink (see ``csink.choose_sink``); without one it
    is the Python sink of this module.
    """
    choice = choice or SinkChoice(PYTHON, None, "Python sink (sink.py)")
    proc = subprocess.Popen(choice.command(host, 0), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("sink listening on "):
            raise RuntimeError(f"the {choice.kind} sink process did not start: {line!r}")
        yield int(line.rsplit(":", 1)[1])
    finally:
        proc.terminate()
        proc.wait()
