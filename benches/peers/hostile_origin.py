#!/usr/bin/env python3
"""An origin that misbehaves, for the proxy's soak test.

    python3 benches/peers/hostile_origin.py PORT

GET /ok/NAME        1 KiB, Cache-Control: public, max-age=30
GET /big/NAME?kb=N  N KiB (default 2048), cacheable, with Content-Length
GET /chunked/NAME?kb=N  the same without Content-Length (chunked)
GET /close/NAME?kb=N    the same, delimited by closing the connection (HTTP/1.0 style)
GET /stall/NAME?ms=N    answers after N ms (default 3000)
GET /reset/NAME     reads the request, then resets the connection (RST, no response)
GET /cut/NAME       announces 64 KiB, sends 1 KiB, then closes
GET /error/NAME     503 or 500 at random, Cache-Control: no-store
GET /headers/NAME?n=N   N response fields (default 200) of 100 bytes each
GET /fat/NAME?kb=N  one response field of N KiB (default 128)
"""
import random
import socket
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CHUNK = b"y" * 65536


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def head(self, status=200, length=None, cache_control="public, max-age=30", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Cache-Control", cache_control)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in extra:
            self.send_header(name, value)

    def body(self, total):
        while total > 0:
            piece = CHUNK[: min(total, len(CHUNK))]
            self.wfile.write(piece)
            total -= len(piece)

    def do_GET(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        kind = url.path.strip("/").split("/", 1)[0]
        kb = int(query.get("kb", ["2048"])[0])
        if kind == "ok":
            self.head(length=1024)
            self.end_headers()
            self.body(1024)
        elif kind == "big":
            self.head(length=kb * 1024)
            self.end_headers()
            self.body(kb * 1024)
        elif kind == "chunked":
            self.head(extra=[("Transfer-Encoding", "chunked")])
            self.end_headers()
            left = kb * 1024
            while left > 0:
                piece = CHUNK[: min(left, len(CHUNK))]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                left -= len(piece)
            self.wfile.write(b"0\r\n\r\n")
        elif kind == "close":
            self.head(extra=[("Connection", "close")])
            self.end_headers()
            self.body(kb * 1024)
            self.close_connection = True
        elif kind == "stall":
            time.sleep(int(query.get("ms", ["3000"])[0]) / 1000)
            self.head(length=1024)
            self.end_headers()
            self.body(1024)
        elif kind == "reset":
            # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            self.connection.close()
            self.close_connection = True
        elif kind == "cut":
            self.head(length=65536)
            self.end_headers()
            self.body(1024)
            self.wfile.flush()
            self.connection.close()
            self.close_connection = True
        elif kind == "error":
            self.head(status=random.choice([500, 503]), length=5, cache_control="no-store")
            self.end_headers()
            self.wfile.write(b"error")
        elif kind == "headers":
            n = int(query.get("n", ["200"])[0])
            self.head(length=2, extra=[(f"X-Field-{i}", "h" * 90) for i in range(n)])
            self.end_headers()
            self.wfile.write(b"ok")
        elif kind == "fat":
            self.head(length=2, extra=[("X-Fat", "f" * (int(query.get("kb", ["128"])[0]) * 1024))])
            self.end_headers()
            self.wfile.write(b"ok")
        else:
            self.send_error(404)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 2048

    def handle_error(self, request, client_address):
        # A client that leaves early (the proxy's timeout) is part of the test.
        pass


if __name__ == "__main__":
    Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
