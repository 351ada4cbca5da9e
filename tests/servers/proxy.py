"""A reverse proxy in front of one storage emulator, run as its own process.

It forwards every request unchanged (the Host header included, so signed requests stay
valid) and streams the answer back, counting requests by method and path. Optionally it
adds a fixed first-byte latency to every request (the "cloud profile": real object
stores answer in 10-100 ms, emulators on loopback in well under one).

    python tests/servers/proxy.py --upstream http://127.0.0.1:5000 --port 0 [--latency 0.02]

prints ``listening on http://127.0.0.1:<port>`` once it accepts connections.

Control routes (not forwarded):

- ``GET /__proxy/counts``: ``{"total": n, "methods": {"GET": n, ...}, "paths": {...}}``
- ``POST /__proxy/reset``: zero the counters
- ``POST /__proxy/latency?seconds=0.02``: change the added latency
- ``POST /__proxy/rate?bytes_per_second=N``: cap each response body's rate (0: no cap)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

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


class Proxy:
    def __init__(self, upstream: str, latency: float, rate: float = 0.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.latency = latency
        self.rate = rate
        self.methods: collections.Counter[str] = collections.Counter()
        self.paths: collections.Counter[str] = collections.Counter()
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

    async def control(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action == "counts":
            body = {
                "total": sum(self.methods.values()),
                "methods": dict(self.methods),
                "paths": dict(self.paths),
            }
            return web.json_response(body)
        if action == "reset" and request.method == "POST":
            self.methods.clear()
            self.paths.clear()
            return web.json_response({"ok": True})
        if action == "latency" and request.method == "POST":
            self.latency = float(request.query.get("seconds", "0"))
            return web.json_response({"latency": self.latency})
        if action == "rate" and request.method == "POST":
            self.rate = float(request.query.get("bytes_per_second", "0"))
            return web.json_response({"rate": self.rate})
        raise web.HTTPNotFound()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        self.methods[request.method] += 1
        self.paths[f"{request.method} {request.path}"] += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        body = await request.read()
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
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            if request.method != "HEAD":
                async for chunk in upstream.content.iter_chunked(1 << 16):
                    await response.write(chunk)
                    if self.rate:
                        await asyncio.sleep(len(chunk) / self.rate)
            await response.write_eof()
            return response


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    parser.add_argument("--rate", type=float, default=0.0, help="body bytes/s cap (0: none)")
    args = parser.parse_args(argv)
    proxy = Proxy(args.upstream, args.latency, args.rate)
    app = web.Application(client_max_size=1 << 34)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    app.router.add_route("*", "/__proxy/{action}", proxy.control)
    app.router.add_route("*", "/{tail:.*}", proxy.forward)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
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


def counts(endpoint: str) -> dict[str, object]:
    """The proxy's counters (for tests)."""
    import urllib.request

    with urllib.request.urlopen(f"{endpoint}/__proxy/counts", timeout=30) as resp:
        data: dict[str, object] = json.load(resp)
    return data


def set_rate(endpoint: str, bytes_per_second: float) -> None:
    """Cap every response body at ``bytes_per_second`` (0 lifts the cap)."""
    import urllib.request

    req = urllib.request.Request(
        f"{endpoint}/__proxy/rate?bytes_per_second={bytes_per_second}", method="POST"
    )
    with urllib.request.urlopen(req, timeout=30):
        pass


def reset(endpoint: str) -> None:
    import urllib.request

    req = urllib.request.Request(f"{endpoint}/__proxy/reset", method="POST")
    with urllib.request.urlopen(req, timeout=30):
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
