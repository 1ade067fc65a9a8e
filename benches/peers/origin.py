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
POST /obj/NAME         a new version of NAME (204); its GETs say `NAME version N`
POST /echo             `length N`: the body's length as its Content-Length gives it (a
                       chunked body, which this server does not read, is length 0)
Every response is HTTP/1.1 with Content-Length; connections are kept alive.
"""
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

COUNTS = {}
VERSIONS = {}
LOCK = threading.Lock()
BODY = b"x" * 1024


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, body, cache_control="public, max-age=3600", head=False, tag=None):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache_control)
        if tag:
            self.send_header("Cache-Tag", tag)
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
