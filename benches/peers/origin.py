#!/usr/bin/env python3
"""The origin the proxy scripts put caches in front of.

    python3 benches/peers/origin.py PORT

GET /obj/NAME          1 KiB, Cache-Control: public, max-age=3600, Cache-Tag: NAME
GET /slow/NAME?ms=N    the same after N ms (default 500), for cold bursts and slow requests;
                       with &cc=VALUE, VALUE is its Cache-Control (cc=no-store: never stored)
GET /count/NAME        how many requests for /obj/NAME or /slow/NAME arrived, as text
GET /moved/NAME        301 to /obj/NAME; with ?abs, to http://HOST:PORT/obj/NAME
GET /site              `site HOST` from X-Forwarded-Host (as a multi-site application
                       behind a load balancer tells sites apart), public, max-age=3600
/base/...              every route again, as an application mounted under /base sees it
                       (its redirects go to /base/obj/NAME)
GET /trickle/NAME      16 KiB (public, max-age=3600, with Content-Length): the first half at
                       once, the second once GET /release/NAME arrives (204)
GET /ws                a WebSocket that sends back every text or binary message
POST /obj/NAME         a new version of NAME (204); its GETs say `NAME version N`
POST /echo             `length N`: the body's length as its Content-Length gives it (a
                       chunked body, which this server does not read, is length 0)
Every response is HTTP/1.1 with Content-Length; connections are kept alive.
"""
import base64
import hashlib
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

COUNTS = {}
VERSIONS = {}
RELEASES = {}
LOCK = threading.Lock()
BODY = b"x" * 1024
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def release(name):
    with LOCK:
        return RELEASES.setdefault(name, threading.Event())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, body, cache_control="public, max-age=3600", head=False, tag=None, extra=()):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache_control)
        if tag:
            self.send_header("Cache-Tag", tag)
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def handle_one(self, head):
        url = urlsplit(self.path)
        base = "/base" if url.path.startswith("/base/") else ""
        parts = url.path[len(base):].strip("/").split("/", 1)
        kind, name = (parts + [""])[:2]
        if kind == "count":
            with LOCK:
                n = COUNTS.get(name, 0)
            self.answer(str(n).encode(), cache_control="no-store", head=head)
            return
        if kind == "targeted":
            # `/targeted/NAME?cdn=1` or `?surrogate=1`: `Cache-Control: max-age=0` beside
            # `CDN-Cache-Control` or `Surrogate-Control: max-age=600`; counted, and the
            # body says which Surrogate-Capability the request carried.
            with LOCK:
                COUNTS[name] = COUNTS.get(name, 0) + 1
            query = parse_qs(url.query)
            field = "CDN-Cache-Control" if "cdn" in query else "Surrogate-Control"
            capability = self.headers.get("Surrogate-Capability", "none")
            self.answer(f"capability {capability}".encode(), cache_control="max-age=0",
                        head=head, extra=[(field, "max-age=600")])
            return
        if kind == "site":
            host = self.headers.get("X-Forwarded-Host", "none")
            self.answer(f"site {host}".encode(), head=head)
            return
        if kind == "moved":
            target = f"{base}/obj/{name}"
            if "abs" in parse_qs(url.query, keep_blank_values=True):
                target = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}{target}"
            self.send_response(301)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind == "release":
            release(name).set()
            self.send_response(204)
            self.end_headers()
            return
        if kind == "trickle":
            with LOCK:
                COUNTS[name] = COUNTS.get(name, 0) + 1
            half = 8 * 1024
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(2 * half))
            self.send_header("Cache-Control", "public, max-age=3600")
            self.end_headers()
            if head:
                return
            self.wfile.write(b"a" * half)
            self.wfile.flush()
            release(name).wait(60)
            self.wfile.write(b"b" * half)
            return
        if kind == "big":
            # `/big/NAME?mb=N`: N MiB, not to be stored, written as fast as it is taken.
            size = int(parse_qs(url.query).get("mb", ["32"])[0]) * 1024 * 1024
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if head:
                return
            chunk = b"c" * 65536
            try:
                for _ in range(size // len(chunk)):
                    self.wfile.write(chunk)
            except OSError:
                pass
            return
        if kind == "ws":
            self.websocket()
            return
        if kind not in ("obj", "slow"):
            self.send_error(404)
            return
        with LOCK:
            COUNTS[name] = COUNTS.get(name, 0) + 1
            version = VERSIONS.get(name)
        query = parse_qs(url.query)
        if kind == "slow":
            ms = int(query.get("ms", ["500"])[0])
            time.sleep(ms / 1000)
        body = BODY if version is None else f"{name} version {version}".encode()
        cache_control = query.get("cc", ["public, max-age=3600"])[0]
        self.answer(body, cache_control=cache_control, head=head, tag=name)

    def websocket(self):
        """The handshake (RFC 6455 section 4.2), then every data frame sent back."""
        key = self.headers.get("Sec-WebSocket-Key", "").encode()
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            self.send_error(400)
            return
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            first = self.rfile.read(2)
            if len(first) < 2:
                break
            opcode, length = first[0] & 0x0F, first[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if first[1] & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                break
            if opcode in (1, 2):
                if len(payload) < 126:
                    header = bytes([0x80 | opcode, len(payload)])
                else:
                    header = bytes([0x80 | opcode, 126]) + struct.pack(">H", len(payload))
                self.wfile.write(header + payload)
                self.wfile.flush()
        self.close_connection = True

    def do_GET(self):
        self.handle_one(head=False)

    def do_HEAD(self):
        self.handle_one(head=True)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if urlsplit(self.path).path == "/echo":
            self.answer(f"length {len(body)}".encode(), cache_control="no-store")
            return
        name = urlsplit(self.path).path.strip("/").split("/", 1)[-1]
        with LOCK:
            VERSIONS[name] = VERSIONS.get(name, 1) + 1
        self.send_response(204)
        self.end_headers()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 2048


if __name__ == "__main__":
    Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
