"""The receiver at the far end of the guest's virtio NIC: reads, hashes, reports.

Run on the host inside the test's network namespace:
``python nic_sink.py ADDRESS PORT`` (port 0 picks one); prints ``ready PORT``.

Each connection starts with one header line, ``NAME MODE N``:

- ``sink 0``: read to EOF.
- ``slow N``: read to EOF in small pieces with a pause every N bytes, so the
  sender's zero-copy pages stay queued (and their notifications late).
- ``reset N``: read N bytes, then close with SO_LINGER 0 (the peer sees a
  reset while it is still sending).

Everything after the header is counted and hashed (SHA-256).  A connection
whose header is ``? NAME`` instead gets, once NAME's connection has ended,
one JSON line: ``{"bytes": ..., "sha256": ..., "end": "eof" | "reset" | ...}``.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import sys
import threading
import time

results: dict[str, dict[str, object]] = {}
done = threading.Condition()


def read_header(conn: socket.socket) -> tuple[str, bytes]:
    buf = b""
    while b"\n" not in buf:
        chunk = conn.recv(256)
        if not chunk:
            raise ConnectionError("closed before its header")
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    return line.decode(), rest


def serve(conn: socket.socket) -> None:
    with conn:
        try:
            header, data = read_header(conn)
        except (OSError, ConnectionError):
            return
        words = header.split()
        if words[0] == "?":
            with done:
                done.wait_for(lambda: words[1] in results, timeout=120)
                reply = results.get(words[1], {"end": "unknown connection"})
            conn.sendall(json.dumps(reply).encode() + b"\n")
            return
        name, mode, n = words[0], words[1], int(words[2])
        digest, count, end = hashlib.sha256(), 0, "eof"
        if mode == "reset":
            data = data[:n]
        digest.update(data)
        count += len(data)
        try:
            while True:
                if mode == "reset" and count >= n:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    end = "reset"
                    break
                want = min(65536, n - count) if mode == "reset" else 65536
                if mode == "slow":
                    want = 4096
                    if count and count % n < 4096:
                        time.sleep(0.02)
                chunk = conn.recv(want)
                if not chunk:
                    break
                digest.update(chunk)
                count += len(chunk)
        except OSError as exc:
            end = f"error: {exc}"
        with done:
            results[name] = {"bytes": count, "sha256": digest.hexdigest(), "end": end}
            done.notify_all()


def main() -> None:
    address, port = sys.argv[1], int(sys.argv[2])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(64)
    print(f"ready {listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
