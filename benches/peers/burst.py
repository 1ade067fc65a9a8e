#!/usr/bin/env python3
"""N concurrent cold requests for one URL, one connection each.

    python3 benches/peers/burst.py HOST PORT PATH N [HOST-HEADER]

Opens N connections at once, sends one GET on each and reads the answer; prints the
count of each status (e.g. `200=1000`). Exits 1 if any request failed to connect.
"""
import asyncio
import sys
from collections import Counter


async def one(host, port, path, host_header):
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n"
    writer.write(request.encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    line = data.split(b"\r\n", 1)[0].split(b" ")
    return line[1].decode() if len(line) > 1 else "empty"


async def main():
    host, port, path, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    # Proxies behind one load balancer all see the site's name.
    host_header = sys.argv[5] if len(sys.argv) > 5 else f"{host}:{port}"
    results = await asyncio.gather(
        *(one(host, port, path, host_header) for _ in range(n)), return_exceptions=True
    )
    counts = Counter(r if isinstance(r, str) else type(r).__name__ for r in results)
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return 0 if all(isinstance(r, str) for r in results) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
