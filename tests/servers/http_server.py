"""A small, real HTTP/1.1 file server for the http backend's tests.

Run it as its own process::

    python tests/servers/http_server.py --root DIR [--port 0] [--certfile PEM --keyfile PEM]
    python -m tests.servers.http_server --root DIR        (from the repository root)

It prints ``listening on http://127.0.0.1:<port>`` (``https://`` with a certificate) once
the socket is bound, then serves the files below ``DIR`` (re-read on every request, so
tests change them on disk). The token of ``/auth/`` comes from ``--token`` or the
``HTTP_SERVER_TOKEN`` environment variable. Only the standard library is used.

Files are served with ``HEAD`` and ``GET``, a strong ``ETag`` derived from mtime and
size, ``Last-Modified``, single ``Range: bytes=a-b`` / ``a-`` / ``-n`` requests
(206 + ``Content-Range``, 416 when unsatisfiable), ``If-Match`` and
``If-Unmodified-Since`` (412). Special routes:

========================  =================================================================
``/redirect?to=U&code=C``  answers ``C`` (default 302) with ``Location: U``
``/chain/N/<path>``        redirects N times, then serves ``<path>``
``/auth/<path>``           serves ``<path>`` only with ``Authorization: Bearer <token>`` (or
                           Basic with the token as password); 401 otherwise
``/status/C?retry_after``  answers status ``C``, with ``Retry-After`` if given
``/echo-auth``             body ``present`` or ``absent``: whether Authorization was sent
``/noetag/<path>``         no ``ETag`` (only ``Last-Modified``)
``/weak/<path>``           a weak ``ETag`` (``W/"..."``) instead of the strong one
``/swap/<path>``           serves ``<path>`` until the first ``GET`` of it has been answered,
                           then ``<path>.next`` (the object replaced between two requests)
``/norange/<path>``        ignores ``Range``, ``If-Match`` and ``If-Unmodified-Since``
``/nohead/<path>``         answers ``HEAD`` with 405
``/md5/<path>``            adds ``Content-MD5`` (of the body sent); ``/badmd5/`` a wrong one
``/gzip/<path>``           adds ``Content-Encoding: gzip`` (the file holds gzip bytes)
``/truncate/<path>``       announces the full length, sends half, closes the connection
``/stream/N/<tag>``        a made-up body of N bytes (byte i is ``i % 251``) with a strong
                           ``ETag``, sent in 64 KiB pieces, ignoring ``Range`` and
                           preconditions; query:
                           ``chunked=1`` (no length, chunked encoding), ``head=n`` (``HEAD``
                           announces n bytes instead of N), ``partial=1`` (answer 206 with the
                           ``Content-Range`` asked for, whatever the body's length)
``/echo-headers``          JSON: the request's headers, names in lower case
``/__requests``            JSON: requests received so far, by path (this route excluded)
``/__sent``                JSON: per ``/stream/`` path, the body bytes written so far and
                           whether the whole body went out (``{"sent": n, "finished": b}``)
========================  =================================================================

A ``/stream/`` body is written piece by piece and counted as it goes, so a test can tell
whether the client stopped reading early: a client that closes the connection makes the
next write fail, and the count stops (short of N) with ``finished`` false.
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import hashlib
import json
import os
import ssl
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

MODES = ("auth", "noetag", "weak", "swap", "md5", "badmd5", "norange", "nohead", "gzip", "truncate")


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], root: Path, token: str) -> None:
        super().__init__(address, Handler)
        self.root = root.resolve()
        self.token = token
        self.counts: Counter[str] = Counter()
        self.sent: dict[str, dict[str, int | bool]] = {}
        self.swapped: set[str] = set()  # /swap/ files whose first GET has been answered
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FileServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # quiet: the test output is for the tests

    def do_HEAD(self) -> None:
        self.route(head=True)

    def do_GET(self) -> None:
        self.route(head=False)

    # ---------------------------------------------------------------- routing
    def route(self, *, head: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if path == "/__requests":
            with self.server.lock:
                body = json.dumps(dict(self.server.counts)).encode()
            return self.reply(200, body, head=head, content_type="application/json")
        if path == "/__sent":
            with self.server.lock:
                body = json.dumps(self.server.sent).encode()
            return self.reply(200, body, head=head, content_type="application/json")
        with self.server.lock:
            self.server.counts[path] += 1
        if path == "/redirect":
            return self.redirect(query.get("to", "/"), int(query.get("code", "302")), head)
        if path.startswith("/chain/"):
            count, _, rest = path[len("/chain/") :].partition("/")
            n = int(count)
            if n > 0:
                return self.redirect(f"/chain/{n - 1}/{rest}", 302, head)
            return self.serve(rest, set(), head)
        if path.startswith("/status/"):
            extra = {}
            if "retry_after" in query:
                extra["Retry-After"] = query["retry_after"]
            code = int(path[len("/status/") :])
            return self.reply(code, b"status %d\n" % code, head=head, headers=extra)
        if path.startswith("/flaky/"):
            # /flaky/<n>/<file>: the first n requests for this path answer 503
            failures, _, rest = path[len("/flaky/") :].partition("/")
            with self.server.lock:
                seen = self.server.counts[path]
            if seen <= int(failures):
                extra = {"Retry-After": query["retry_after"]} if "retry_after" in query else {}
                return self.reply(503, b"slow down\n", head=head, headers=extra)
            return self.serve(rest, set(), head)
        if path.startswith("/stream/"):
            return self.stream(path, query, head)
        if path == "/echo-headers":
            seen = {name.lower(): value for name, value in self.headers.items()}
            body = json.dumps(seen).encode()
            return self.reply(200, body, head=head, content_type="application/json")
        if path == "/echo-auth":
            sent = "Authorization" in self.headers
            return self.reply(200, b"present" if sent else b"absent", head=head)
        modes: set[str] = set()
        rest = path.lstrip("/")
        while rest.split("/", 1)[0] in MODES and "/" in rest:
            mode, rest = rest.split("/", 1)
            modes.add(mode)
        return self.serve(rest, modes, head)

    # ---------------------------------------------------------------- replies
    def reply(
        self,
        code: int,
        body: bytes,
        *,
        head: bool,
        headers: dict[str, str] | None = None,
        content_type: str = "text/plain",
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def redirect(self, location: str, code: int, head: bool) -> None:
        self.reply(code, b"moved\n", head=head, headers={"Location": location})

    def stream(self, path: str, query: dict[str, str], head: bool) -> None:
        """A made-up body that ignores ``Range`` (see the module docstring)."""
        size = int(path[len("/stream/") :].split("/", 1)[0])
        chunked = query.get("chunked") == "1"
        code = 200
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{size:x}"'}  # the body never changes
        wanted = self.headers.get("Range")
        if query.get("partial") == "1" and wanted and not head:
            first, _, last = wanted.partition("=")[2].partition("-")
            code = 206
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        if head:
            headers["Content-Length"] = query.get("head", str(size))
        elif chunked:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(size)
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if head:
            return
        with self.server.lock:
            record = self.server.sent.setdefault(path, {"sent": 0, "finished": False})
        piece = bytes(i % 251 for i in range(251 * 261))  # 65511 bytes, the pattern repeats
        sent = 0
        try:
            while sent < size:
                n = min(len(piece) - 251, size - sent)
                part = piece[sent % 251 : sent % 251 + n]
                if chunked:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                else:
                    self.wfile.write(part)
                sent += n
                with self.server.lock:
                    record["sent"] = sent
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client hung up: stop writing
            return
        with self.server.lock:
            record["finished"] = True

    def authorized(self) -> bool:
        value = self.headers.get("Authorization", "")
        if value == f"Bearer {self.server.token}":
            return True
        if value.startswith("Basic "):
            try:
                decoded = base64.b64decode(value[6:]).decode()
            except ValueError:
                return False
            return decoded.partition(":")[2] == self.server.token
        return False

    def serve(self, rel: str, modes: set[str], head: bool) -> None:
        if "auth" in modes and not self.authorized():
            return self.reply(
                401, b"unauthorized\n", head=head, headers={"WWW-Authenticate": "Bearer"}
            )
        if "nohead" in modes and head:
            return self.reply(405, b"", head=head, headers={"Allow": "GET"})
        if "swap" in modes:
            with self.server.lock:
                swapped = rel in self.server.swapped
                if not head:
                    self.server.swapped.add(rel)
            rel = rel + ".next" if swapped else rel
        root = self.server.root
        target = (root / rel).resolve()
        if root not in target.parents or not target.is_file():
            return self.reply(404, b"not found\n", head=head)
        st = target.stat()
        size = st.st_size
        etag = f'"{st.st_mtime_ns:x}-{size:x}"'
        modified = email.utils.formatdate(st.st_mtime, usegmt=True)
        headers = {"Last-Modified": modified, "Accept-Ranges": "bytes"}
        if "weak" in modes:
            etag = "W/" + etag
        if "noetag" not in modes:
            headers["ETag"] = etag
        if "gzip" in modes:
            headers["Content-Encoding"] = "gzip"
        if "norange" not in modes and not self.preconditions_hold(
            None if "noetag" in modes else etag, int(st.st_mtime)
        ):
            return self.reply(412, b"precondition failed\n", head=head, headers=headers)
        start, end = 0, size  # [start, end)
        code = 200
        wanted = self.headers.get("Range")
        if wanted and "norange" not in modes:
            parsed = parse_range(wanted, size)
            if parsed == "unsatisfiable":
                headers["Content-Range"] = f"bytes */{size}"
                return self.reply(416, b"", head=head, headers=headers)
            if parsed is not None:
                start, end = parsed
                code = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        with open(target, "rb") as fh:
            fh.seek(start)
            body = fh.read(end - start)
        if modes & {"md5", "badmd5"}:
            summed = body if "md5" in modes else b"not the body"
            headers["Content-MD5"] = base64.b64encode(hashlib.md5(summed).digest()).decode()
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if head:
            return
        if "truncate" in modes:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def preconditions_hold(self, etag: str | None, mtime: int) -> bool:
        if_match = self.headers.get("If-Match")
        if if_match is not None:
            tags = [t.strip() for t in if_match.split(",")]
            if "*" in tags:
                return True
            # Strong comparison: a weak tag never matches.
            return etag is not None and not etag.startswith("W/") and etag in tags
        since = self.headers.get("If-Unmodified-Since")
        if since is not None:
            try:
                limit = email.utils.parsedate_to_datetime(since).timestamp()
            except (TypeError, ValueError):
                return True  # an invalid date is ignored (RFC 9110 13.1.4)
            return mtime <= limit
        return True


def parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """``(start, end)`` for one satisfiable range, ``"unsatisfiable"``, or ``None`` when
    the header is malformed or asks for several ranges (then the whole file is sent)."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()):
        return None
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size
    start = int(first)
    if last and not last.isdigit():
        return None
    if last and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    end = min(size, int(last) + 1) if last else size
    return start, end


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=os.environ.get("HTTP_SERVER_TOKEN", ""))
    parser.add_argument("--certfile", help="serve https with this certificate (PEM)")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM)")
    args = parser.parse_args(argv)
    server = FileServer((args.host, args.port), args.root, args.token)
    scheme = "http"
    if args.certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.certfile, args.keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    host, port = server.server_address[:2]
    print(f"listening on {scheme}://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
