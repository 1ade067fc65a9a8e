#!/usr/bin/env python3
"""N concurrent cold requests for one URL, one connection each.

    python3 benches/peers/burst.py HOST PORT PATH N

Opens N connections at once, sends one GET on each and reads the answer; prints the
count of each status (e.g. `200=1000`). Exits 1 if any request failed to connect.
"""
import asyncio
import sys
from collections import Counter


async def one(host, port, path):
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    writer.write(request.encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    line = data.split(b"\r\n", 1)[0].split(b" ")
    return line[1].decode() if len(line) > 1 else "empty"


async def main():
    host, port, path, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    results = await asyncio.gather(
        *(one(host, port, path) for _ in range(n)), return_exceptions=True
    )
    counts = Counter(r if isinstance(r, str) else type(r).__name__ for r in results)
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return 0 if all(isinstance(r, str) for r in results) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
