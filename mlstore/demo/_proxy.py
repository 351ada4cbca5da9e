"""The demo's latency proxy: it forwards every request to one upstream (the S3
emulator) after a fixed first-byte delay, and counts what passes.

Emulators on loopback answer in well under a millisecond; real object stores take
10-100 ms before the first byte. The proxy adds that delay to every request (``--latency``,
the "cloud profile"), so a cache that saves requests shows it, and it counts requests by
method and the body bytes it sent back: the same yardstick for every client in the demo.

    python -m mlstore.demo._proxy --upstream http://127.0.0.1:5000 [--latency 0.02]

prints ``listening on http://127.0.0.1:<port>`` once it accepts connections. Control
routes (neither delayed nor counted):

- ``GET /__demo/counts``: ``{"requests": n, "methods": {"GET": n, ...}, "bytes_out": n}``
- ``POST /__demo/reset``: zero the counts.

Requests are forwarded unchanged, the Host header included, so signed requests stay valid.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import sys
from collections.abc import AsyncIterator

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

#: Headers that describe one connection, not the message: never forwarded.
_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
     "proxy-authorization", "proxy-authenticate", "content-length"}
)  # fmt: skip


class Counts:
    """What the proxy forwarded since the last reset."""

    def __init__(self) -> None:
        self.methods: collections.Counter[str] = collections.Counter()
        self.bytes_out = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": sum(self.methods.values()),
            "methods": dict(self.methods),
            "bytes_out": self.bytes_out,
        }


def make_app(upstream: str, latency: float) -> web.Application:
    """The proxy as an aiohttp application forwarding to ``upstream``."""
    counts = Counts()
    app = web.Application(client_max_size=1 << 31)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = TCPConnector(limit=0)
        async with ClientSession(
            connector=connector, timeout=ClientTimeout(total=None), auto_decompress=False
        ) as session:
            app["session"] = session
            yield

    app.cleanup_ctx.append(session_ctx)

    async def get_counts(request: web.Request) -> web.Response:
        return web.json_response(counts.as_dict())

    async def reset(request: web.Request) -> web.Response:
        counts.methods.clear()
        counts.bytes_out = 0
        return web.json_response(counts.as_dict())

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if latency > 0:
            await asyncio.sleep(latency)
        counts.methods[request.method] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        session: ClientSession = request.app["session"]
        async with session.request(
            request.method,
            upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Content-Type", "Accept", "Accept-Encoding"),
        ) as answer:
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            for name, value in answer.headers.items():
                if name.lower() not in _HOP:
                    response.headers.add(name, value)
            if answer.content_length is not None:
                response.content_length = answer.content_length
            await response.prepare(request)
            async for chunk in answer.content.iter_chunked(1 << 16):
                counts.bytes_out += len(chunk)
                await response.write(chunk)
            await response.write_eof()
            return response

    app.router.add_get("/__demo/counts", get_counts)
    app.router.add_post("/__demo/reset", reset)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def _serve(upstream: str, latency: float, port: int) -> None:
    runner = web.AppRunner(make_app(upstream.rstrip("/"), latency), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"listening on http://127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    # SIGTERM (how the demo stops it) ends the process cleanly, connections closed.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlstore.demo._proxy")
    parser.add_argument("--upstream", required=True, help="the server to forward to")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds before each answer")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.upstream, args.latency, args.port))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
