"""A fault-injecting HTTP proxy on loopback, in front of the local S3 server.

Every `fail_every`-th request (when > 0) is answered with 503 SlowDown instead of being forwarded;
while `down` is set every request gets its connection closed with no response, as from a store
that went away; while `deny` is set every request gets 403 AccessDenied (no permission); a request
whose path contains `hold` hangs until `release()`, then has its connection closed, never forwarded
(a store that stalls on those objects). Counts what it did, and keeps (method, path) of every request
in `seen`, so a test can prove the faults happened and wait for what a client does.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}
DENIED = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
SLOWDOWN = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>injected</Message></Error>"


class FaultyS3Proxy:
    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.fail_every = 0
        self.down = False
        self.deny = False
        self.fail_matching: tuple[str, int] | None = None  # (path suffix, how many more times to 503 it)
        self.hold: str | None = None
        self.requests = self.injected = self.dropped = self.held = 0
        self.seen: list[tuple[str, str]] = []
        self._released = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = b""  # HTTP/1.1 chunked upload: forward it de-chunked, with a length
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()

            def _handle(self):
                body = self._body()
                with proxy._lock:
                    proxy.requests += 1
                    proxy.seen.append((self.command, self.path.split("?")[0]))
                    n = proxy.requests
                    held = bool(proxy.hold) and proxy.hold in self.path
                    proxy.held += held
                    drop = proxy.down or held
                    fail = not drop and proxy.fail_every and n % proxy.fail_every == 0
                    suffix, left = proxy.fail_matching or ("", 0)
                    if not drop and left and self.path.split("?")[0].endswith(suffix):
                        fail, proxy.fail_matching = True, (suffix, left - 1)
                    proxy.dropped += drop and not held
                    proxy.injected += bool(fail)
                if held:
                    proxy._released.wait(600)
                if drop:
                    self.close_connection = True
                    self.connection.close()
                    return
                if fail or proxy.deny:
                    status, payload = (403, DENIED) if proxy.deny else (503, SLOWDOWN)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP | {"content-length"}}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                # HEAD carries the object's size in Content-Length, with no body.
                size = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", size)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def release(self) -> None:
        """Held requests are dropped (their connections closed) and `hold` is off."""
        with self._lock:
            self.hold = None
        self._released.set()

    def close(self):
        self._released.set()
        self.server.shutdown()
        self.server.server_close()
