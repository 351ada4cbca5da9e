"""A reverse proxy in front of one storage emulator, run as its own process, that counts
requests and injects faults on demand.

It forwards every request unchanged (the Host header included, so signed requests stay
valid) and streams the answer back, counting requests by method and path. Optionally it
adds a fixed first-byte latency to every request (the "cloud profile": real object
stores answer in 10-100 ms, emulators on loopback in well under one) or caps the body
rate. A ``Location`` header that points at the upstream is rewritten to point at the
proxy, so follow-up requests (redirects, upload sessions) come back through it.

    python tests/servers/proxy.py --upstream http://127.0.0.1:5000 --port 0 [--latency 0.02]

prints ``listening on http://127.0.0.1:<port>`` once it accepts connections.

Control routes (not forwarded, not counted):

- ``GET /__proxy/counts``: ``{"total", "methods": {"GET": n}, "paths": {"GET /p": n},
  "faults": {kind: n}, "bytes_out": n, "bytes_in": n, "peak_in_flight": n}``
  (``bytes_out``: body bytes sent to clients; ``bytes_in``: request body bytes received
  from them; ``peak_in_flight``: most requests forwarded at once)
- ``POST /__proxy/reset``: zero the counters and empty the request log (the fault rules
  and their own progress, ``times``/``skip``/random state, are kept)
- ``POST /__proxy/latency?seconds=0.02``: change the added latency
- ``POST /__proxy/rate?bytes_per_second=N``: cap each response body's rate (0: no cap)
- ``POST /__proxy/faults`` with ``{"rules": [rule, ...]}``: replace the fault rules (fresh
  progress); ``DELETE`` (or an empty list) clears them; ``GET`` shows them with progress
- ``GET /__proxy/log``: the last 10,000 requests in arrival order: ``{"method", "path",
  "query", "range", "if_match", "generation", "status", "fault", "bytes_out"}``; no
  credential is ever logged (signature-like query parameters are redacted)
- ``GET /__proxy/idle?timeout=10``: wait until no forwarded request is in flight (or the
  timeout passes); answers ``{"in_flight": n}``

A rule (JSON object; see :class:`Rule`): ``fault`` is one of ``status``, ``reset``,
``truncate``, ``stall``, ``flip``, ``latency``. Requests are matched by the optional
``method`` (exact), ``path`` / ``query`` (``re.search`` on the decoded path / the raw
query string) and ``range`` (true: only with a Range header; false: only without). A
matching request is let through untouched while the rule's ``skip`` count lasts, then
fires with ``probability`` (a ``random.Random(seed)`` per rule, so runs repeat), at most
``times`` times. The first rule that fires applies; one fault per request at most.

- ``status``: answer ``status`` (503) with ``headers`` and ``body`` (an S3-style XML
  error by default) without forwarding.
- ``reset``: forward, send the headers and ``offset`` body bytes, wait until the client
  has acknowledged them, then abort the connection with a TCP RST.
- ``truncate``: forward, send the headers (the full Content-Length) and ``offset`` body
  bytes, then close cleanly (FIN); a chunked body ends without its final zero chunk.
- ``stall``: forward, send the headers and ``offset`` body bytes (or nothing at all with
  ``before_headers``), then nothing for ``seconds`` (3600), then close. A client that
  disconnects ends the stall at once.
- ``flip``: forward the whole body with the byte at ``offset`` XOR 0xFF.
- ``latency``: wait ``seconds`` before forwarding.

``offset`` defaults to the middle of the body (by its Content-Length; 0 when unknown)
for ``reset``, ``truncate`` and ``flip`` and to 0 for ``stall``. A body shorter than
``offset`` is sent whole before the connection is cut.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import random
import re
import socket
import struct
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import ClientError, ClientResponse, ClientSession, ClientTimeout, TCPConnector, web

if TYPE_CHECKING:
    from tests.emulators import ServerProcess

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
KINDS = ("status", "reset", "truncate", "stall", "flip", "latency")
CUTS = ("reset", "truncate", "stall")  # kinds that end the connection mid-answer
LOG_SIZE = 10_000
# Query parameters that carry credentials (presigned S3/GCS URLs, Azure SAS, OAuth).
SECRET_PARAMS = re.compile(
    r"(?i)^(x-amz-signature|x-amz-credential|x-amz-security-token|signature|awsaccesskeyid"
    r"|x-goog-signature|x-goog-credential|sig|access_token|key|token)$"
)
ERRORS = {
    429: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


@dataclass
class Rule:
    """One fault rule; the JSON fields are the constructor's arguments."""

    fault: str
    method: str | None = None
    path: str | None = None
    query: str | None = None
    range: bool | None = None
    skip: int = 0
    times: int | None = None
    probability: float = 1.0
    seed: int = 0
    status: int = 503  # status
    headers: dict[str, str] = field(default_factory=dict)  # status
    body: str | None = None  # status
    offset: int | None = None  # reset, truncate, stall, flip
    before_headers: bool = False  # stall
    seconds: float | None = None  # stall (3600), latency (0)
    seen: int = field(default=0, init=False)  # matching requests so far
    fired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.fault not in KINDS:
            raise ValueError(f"unknown fault {self.fault!r}; one of {', '.join(KINDS)}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be within 0..1")
        self._path = re.compile(self.path) if self.path is not None else None
        self._query = re.compile(self.query) if self.query is not None else None
        self._random = random.Random(self.seed)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rule:
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown rule fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fires(self, request: web.Request) -> bool:
        """Whether the rule applies to ``request``; updates the rule's progress."""
        if self.method is not None and request.method != self.method.upper():
            return False
        if self._path is not None and not self._path.search(request.path):
            return False
        if self._query is not None and not self._query.search(request.query_string):
            return False
        if self.range is not None and ("Range" in request.headers) != self.range:
            return False
        if self.times is not None and self.fired >= self.times:
            return False  # spent
        self.seen += 1
        if self.seen <= self.skip:
            return False
        if self.probability < 1.0 and self._random.random() >= self.probability:
            return False
        self.fired += 1
        return True


def log_entry(request: web.Request) -> dict[str, Any]:
    """What the log keeps of a request: never a header that carries credentials."""
    query = "&".join(
        f"{name}=REDACTED" if SECRET_PARAMS.match(name) else part
        for part in request.query_string.split("&")
        if part
        for name in [part.partition("=")[0]]
    )
    generation = (
        request.headers.get("x-goog-if-generation-match")
        or request.query.get("ifGenerationMatch")
        or request.query.get("generation")
    )
    return {
        "method": request.method,
        "path": request.path,
        "query": query,
        "range": request.headers.get("Range") or request.headers.get("x-ms-range"),
        "if_match": request.headers.get("If-Match"),
        "generation": generation,
        "status": None,
        "fault": None,
        "bytes_out": 0,
    }


def unacknowledged(sock: Any) -> int:
    """Bytes in the kernel's send queue not yet acknowledged by the peer (0 off Linux)."""
    try:
        import fcntl
        import termios

        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (ImportError, AttributeError, OSError):
        return 0
    return int(struct.unpack("i", raw)[0])


class Proxy:
    def __init__(self, upstream: str, latency: float, rate: float = 0.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.latency = latency
        self.rate = rate
        self.methods: collections.Counter[str] = collections.Counter()
        self.paths: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self.bytes_out = 0
        self.bytes_in = 0
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=LOG_SIZE)
        self.rules: list[Rule] = []
        self.in_flight = 0
        self.peak_in_flight = 0  # most requests in flight at once since the last reset
        self.idle = asyncio.Event()
        self.idle.set()
        self.session: ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        self.session = ClientSession(
            connector=TCPConnector(limit=0),
            timeout=ClientTimeout(total=None),
            auto_decompress=False,
        )

    async def stop(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    # ------------------------------------------------------------------ control
    async def control(self, request: web.Request) -> web.Response:
        action, method = request.match_info["action"], request.method
        if action == "counts":
            return web.json_response(
                {
                    "total": sum(self.methods.values()),
                    "methods": dict(self.methods),
                    "paths": dict(self.paths),
                    "faults": dict(self.faults),
                    "bytes_out": self.bytes_out,
                    "bytes_in": self.bytes_in,
                    "peak_in_flight": self.peak_in_flight,
                }
            )
        if action == "reset" and method == "POST":
            for counter in (self.methods, self.paths, self.faults):
                counter.clear()
            self.bytes_out = 0
            self.bytes_in = 0
            self.peak_in_flight = self.in_flight
            self.log.clear()
            return web.json_response({"ok": True})
        if action == "latency" and method == "POST":
            self.latency = float(request.query.get("seconds", "0"))
            return web.json_response({"latency": self.latency})
        if action == "rate" and method == "POST":
            self.rate = float(request.query.get("bytes_per_second", "0"))
            return web.json_response({"rate": self.rate})
        if action == "faults":
            if method == "POST":
                try:
                    self.rules = [Rule.from_json(r) for r in (await request.json())["rules"]]
                except (ValueError, TypeError, KeyError, re.error) as exc:
                    raise web.HTTPBadRequest(text=f"bad fault rules: {exc}") from exc
            elif method == "DELETE":
                self.rules = []
            return web.json_response({"rules": [r.as_json() for r in self.rules]})
        if action == "log":
            return web.json_response(list(self.log))
        if action == "idle":
            try:
                await asyncio.wait_for(self.idle.wait(), float(request.query.get("timeout", "10")))
            except asyncio.TimeoutError:
                pass
            return web.json_response({"in_flight": self.in_flight})
        raise web.HTTPNotFound()

    # ------------------------------------------------------------------ forwarding
    async def forward(self, request: web.Request) -> web.StreamResponse:
        self.methods[request.method] += 1
        self.paths[f"{request.method} {request.path}"] += 1
        entry = log_entry(request)
        self.log.append(entry)
        rule = next((r for r in self.rules if r.fires(request)), None) if self.rules else None
        if rule is not None:
            self.faults[rule.fault] += 1
            entry["fault"] = rule.fault
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self.idle.clear()
        try:
            return await self.serve(request, rule, entry)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()

    async def serve(
        self, request: web.Request, rule: Rule | None, entry: dict[str, Any]
    ) -> web.StreamResponse:
        assert self.session is not None
        kind = rule.fault if rule is not None else None
        delay = self.latency + ((rule.seconds or 0.0) if rule and kind == "latency" else 0.0)
        if delay:
            await asyncio.sleep(delay)
        body = await request.read()
        self.bytes_in += len(body)
        if rule is not None and kind == "status":
            return await self.answer_status(request, rule, entry)
        if rule is not None and kind == "stall" and rule.before_headers:
            await self.stall(request, rule)
            return web.Response()  # never sent: the connection is closed
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        async with self.session.request(
            request.method,
            self.upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() == "location" and value.startswith(self.upstream):
                    value = f"{request.scheme}://{request.host}{value[len(self.upstream) :]}"
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            entry["status"] = upstream.status
            await response.prepare(request)
            try:
                if request.method != "HEAD":
                    await self.copy_body(upstream, response, rule, entry)
            except (ClientError, OSError):
                # The client left, or the upstream failed mid-body: end the connection,
                # so the client sees a short body (as from a real server that failed).
                request.protocol.force_close()
                return response
            if rule is None or kind not in CUTS:
                await response.write_eof()
            elif kind == "truncate":
                request.protocol.force_close()  # FIN after what was written
            elif kind == "reset":
                await self.reset(request)
            elif kind == "stall":
                await self.stall(request, rule)
            return response

    async def copy_body(
        self,
        upstream: ClientResponse,
        response: web.StreamResponse,
        rule: Rule | None,
        entry: dict[str, Any],
    ) -> None:
        limit = flip = None
        chunks: AsyncIterator[bytes] = upstream.content.iter_chunked(1 << 16)
        length = upstream.content_length
        if rule is not None and rule.fault == "flip":
            if rule.offset is None and length is None:  # read it whole to find the middle
                data = await upstream.read()
                flip, chunks = len(data) // 2, _once(data)
            else:
                flip = rule.offset if rule.offset is not None else (length or 0) // 2
        elif rule is not None and rule.fault in CUTS:
            limit = rule.offset if rule.offset is not None else 0
            if rule.offset is None and rule.fault != "stall":
                limit = (length or 0) // 2
            if limit == 0:
                return
        pos = 0
        async for chunk in chunks:
            if limit is not None and pos + len(chunk) > limit:
                chunk = chunk[: limit - pos]
            if flip is not None and pos <= flip < pos + len(chunk):
                changed = bytearray(chunk)
                changed[flip - pos] ^= 0xFF
                chunk = bytes(changed)
            await response.write(chunk)
            pos += len(chunk)
            self.bytes_out += len(chunk)
            entry["bytes_out"] += len(chunk)
            if self.rate:
                await asyncio.sleep(len(chunk) / self.rate)
            if limit is not None and pos >= limit:
                return

    async def answer_status(
        self, request: web.Request, rule: Rule, entry: dict[str, Any]
    ) -> web.Response:
        if rule.body is not None:
            text = rule.body
        else:
            code, message = ERRORS.get(rule.status, ("InjectedFault", "An injected fault."))
            text = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
        data = b"" if request.method == "HEAD" else text.encode()
        headers = {"Content-Type": "application/xml", **rule.headers}
        response = web.Response(status=rule.status, body=data, headers=headers)
        entry["status"] = rule.status
        entry["bytes_out"] = len(data)
        self.bytes_out += len(data)
        return response

    async def reset(self, request: web.Request) -> None:
        """Abort the connection with an RST once the client has everything sent so far
        (an RST discards what is still queued), or after 10 s of the client not reading."""
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while not transport.is_closing() and loop.time() < deadline:
            if not transport.get_write_buffer_size() and not unacknowledged(sock):
                break
            await asyncio.sleep(0.002)
        if sock is not None and not transport.is_closing():
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        request.protocol.force_close()

    async def stall(self, request: web.Request, rule: Rule) -> None:
        """Send nothing for ``seconds``, then close. The server runs with handler
        cancellation, so a client that goes away cancels this wait."""
        await asyncio.sleep(rule.seconds if rule.seconds is not None else 3600.0)
        request.protocol.force_close()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    parser.add_argument("--rate", type=float, default=0.0, help="body bytes/s cap (0: none)")
    args = parser.parse_args(argv)

    async def serve() -> None:
        proxy = Proxy(args.upstream, args.latency, args.rate)
        app = web.Application(client_max_size=1 << 34)
        app.on_startup.append(proxy.start)
        app.on_cleanup.append(proxy.stop)
        app.router.add_route("*", "/__proxy/{action}", proxy.control)
        app.router.add_route("*", "/{tail:.*}", proxy.forward)
        # Handler cancellation: a client that disconnects cancels its handler (a stall
        # ends, the upstream request is dropped).
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"listening on http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------- helpers (tests)


def process(upstream: str, port: int = 0) -> ServerProcess:
    """A proxy process in front of ``upstream`` (on ``port``, or any free one), not
    started yet."""
    from tests.emulators import ServerProcess

    return ServerProcess(
        "proxy",
        [sys.executable, __file__, "--upstream", upstream, "--port", str(port)],
        r"listening on http://127\.0\.0\.1:(?P<port>\d+)",
    )


def _call(endpoint: str, action: str, method: str = "GET", body: object = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{endpoint}/__proxy/{action}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"} if data is not None else {},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        if exc.code == 400:
            raise ValueError(exc.read().decode()) from None
        raise


def counts(endpoint: str) -> dict[str, Any]:
    """The proxy's counters (for tests)."""
    data: dict[str, Any] = _call(endpoint, "counts")
    return data


def set_latency(endpoint: str, seconds: float) -> None:
    """Add ``seconds`` before every forwarded request (0: none)."""
    _call(endpoint, f"latency?seconds={seconds}", "POST")


def set_rate(endpoint: str, bytes_per_second: float) -> None:
    """Cap every response body at ``bytes_per_second`` (0 lifts the cap)."""
    _call(endpoint, f"rate?bytes_per_second={bytes_per_second}", "POST")


def reset(endpoint: str) -> None:
    """Zero the counters and empty the request log (the fault rules stay)."""
    _call(endpoint, "reset", "POST")


def requests(endpoint: str, method: str) -> int:
    """How many ``method`` requests the proxy forwarded since its last reset (for tests)."""
    methods = counts(endpoint)["methods"]
    assert isinstance(methods, dict)
    return int(methods.get(method, 0))


def set_faults(endpoint: str, *rules: dict[str, Any]) -> None:
    """Replace the fault rules (see the module docstring); ValueError for a bad rule."""
    _call(endpoint, "faults", "POST", {"rules": list(rules)})


def clear_faults(endpoint: str) -> None:
    _call(endpoint, "faults", "DELETE")


def request_log(endpoint: str) -> list[dict[str, Any]]:
    """The forwarded requests, oldest first (see the module docstring)."""
    data: list[dict[str, Any]] = _call(endpoint, "log")
    return data


def wait_idle(endpoint: str, timeout: float = 10.0) -> int:
    """Wait until no request is in flight through the proxy (at most ``timeout``
    seconds); the number still in flight."""
    return int(_call(endpoint, f"idle?timeout={timeout}")["in_flight"])


if __name__ == "__main__":
    main(sys.argv[1:])
