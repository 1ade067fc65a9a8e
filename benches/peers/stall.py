#!/usr/bin/env python3
"""One GET for a body that stalls half-way (origin.py's /trickle/NAME), through a proxy.

    python3 benches/peers/stall.py HOST PORT ORIGIN-PORT NAME [RELEASE-MS]

Sends `GET /trickle/NAME` to the proxy; RELEASE-MS (default 1000) after it was sent, asks
the origin for `/release/NAME`, which sends the second half. Prints when the first byte
of the body and the whole body arrived, in milliseconds after the request was sent: a
proxy that passes the body on as it arrives has the first byte long before RELEASE-MS, one
that reads it whole first only after.
"""
import socket
import sys
import threading
import time
import urllib.request


def main():
    host, port, origin, name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    release_ms = int(sys.argv[5]) if len(sys.argv) > 5 else 1000
    conn = socket.create_connection((host, port), timeout=30)
    start = time.monotonic()
    conn.sendall(
        f"GET /trickle/{name} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    )

    def release():
        time.sleep(release_ms / 1000)
        urllib.request.urlopen(f"http://127.0.0.1:{origin}/release/{name}").read()

    threading.Thread(target=release, daemon=True).start()
    data, first = b"", None
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and body and first is None:
            first = time.monotonic()
    whole = time.monotonic()
    body = data.partition(b"\r\n\r\n")[2]
    ms = lambda t: (t - start) * 1000
    print(f"first byte {ms(first):.0f} ms, whole {ms(whole):.0f} ms, {len(body)} bytes")


if __name__ == "__main__":
    main()
