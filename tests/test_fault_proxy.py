"""The fault proxy (tests/servers/proxy.py) itself, in front of the test HTTP server.

A raw socket client sees exactly what the proxy sends: the status line, the headers, the
body bytes, and how the connection ended (clean EOF, reset, or a read timeout).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.emulators import ServerProcess
from tests.servers import proxy

pytestmark = pytest.mark.faults

MiB = 1 << 20


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes  # every byte after the header block, as received
    error: type[BaseException] | None  # how the read ended; None: a clean EOF


def fetch(
    endpoint: str,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Reply:
    """One request on a fresh connection (``Connection: close``), read to the end."""
    parts = urlsplit(endpoint)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    raw = bytearray()
    error: type[BaseException] | None = None
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except OSError as exc:  # ConnectionResetError, TimeoutError
                error = type(exc)
                break
            if not chunk:
                break
            raw += chunk
    head, sep, body = bytes(raw).partition(b"\r\n\r\n")
    if not sep:
        return Reply(0, {}, b"", error)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(":", 1) for line in header_lines)
    return Reply(
        int(status_line.split()[1]),
        {k.strip().lower(): v.strip() for k, v in fields.items()},
        body,
        error,
    )


def dechunk(raw: bytes) -> tuple[bytes, bool]:
    """The data of a chunked body, and whether it ended with the zero-size chunk."""
    out, pos = bytearray(), 0
    while (eol := raw.find(b"\r\n", pos)) >= 0:
        size = int(raw[pos:eol].split(b";")[0], 16)
        if size == 0:
            return bytes(out), True
        out += raw[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2
    return bytes(out), False


def upstream_requests(http_endpoint: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{http_endpoint}/__requests", timeout=30) as resp:
        data: dict[str, int] = json.load(resp)
    return data


# ------------------------------------------------------------------------------ fixtures


@dataclass
class Setup:
    proxy: str  # the proxy's endpoint
    upstream: str  # the HTTP server's endpoint
    path: str  # URL path of a 1 MiB file of random bytes
    other: str  # URL path of a second, 64 KiB file
    data: bytes
    other_data: bytes


@pytest.fixture(scope="module")
def proxy_process(http_server: tuple[ServerProcess, str]) -> Iterator[ServerProcess]:
    server = proxy.process(http_server[0].endpoint).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def files(http_server: tuple[ServerProcess, str]) -> tuple[str, str, bytes, bytes]:
    folder = f"faults-{uuid.uuid4().hex[:8]}"
    (Path(http_server[1]) / folder).mkdir()
    data, other_data = os.urandom(MiB), os.urandom(64 << 10)
    (Path(http_server[1]) / folder / "b.bin").write_bytes(data)
    (Path(http_server[1]) / folder / "other.bin").write_bytes(other_data)
    return f"/{folder}/b.bin", f"/{folder}/other.bin", data, other_data


@pytest.fixture
def setup(
    proxy_process: ServerProcess,
    http_server: tuple[ServerProcess, str],
    files: tuple[str, str, bytes, bytes],
) -> Iterator[Setup]:
    """No rules, zero counters, an empty log; the rules are cleared afterwards too."""
    endpoint = proxy_process.endpoint
    proxy.clear_faults(endpoint)
    proxy.reset(endpoint)
    yield Setup(endpoint, http_server[0].endpoint, *files)
    proxy.clear_faults(endpoint)


CHUNKED_BODY = os.urandom(100_000)


class _ChunkedHandler(BaseHTTPRequestHandler):
    """Answers every GET with CHUNKED_BODY in chunked transfer encoding."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(CHUNKED_BODY), 10_000):
            piece = CHUNKED_BODY[i : i + 10_000]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the proxy drops a truncated upstream mid-body on purpose


@pytest.fixture(scope="module")
def chunked_proxy() -> Iterator[str]:
    """A proxy in front of a server whose answers are chunked (the test HTTP server always
    sends Content-Length)."""
    upstream = _QuietServer(("127.0.0.1", 0), _ChunkedHandler)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    server = proxy.process(f"http://127.0.0.1:{upstream.server_address[1]}").start()
    yield server.endpoint
    server.stop()
    upstream.shutdown()
    upstream.server_close()
    thread.join()


# --------------------------------------------------------------------------------- tests


def test_without_rules_a_range_request_is_forwarded_byte_exactly(setup: Setup) -> None:
    reply = fetch(setup.proxy, setup.path, headers={"Range": "bytes=1000-4999"})
    assert (reply.status, reply.error) == (206, None)
    assert reply.headers["content-range"] == f"bytes 1000-4999/{MiB}"
    assert reply.body == setup.data[1000:5000]
    whole = fetch(setup.proxy, setup.path)
    assert (whole.status, whole.body) == (200, setup.data)
    assert proxy.counts(setup.proxy)["faults"] == {}


def test_status_503_answers_retry_after_and_an_xml_error_without_forwarding(
    setup: Setup,
) -> None:
    before = upstream_requests(setup.upstream).get(setup.path, 0)
    proxy.set_faults(
        setup.proxy, {"fault": "status", "status": 503, "headers": {"Retry-After": "2"}}
    )
    reply = fetch(setup.proxy, setup.path)
    assert (reply.status, reply.error) == (503, None)
    assert reply.headers["retry-after"] == "2"
    assert reply.headers["content-type"].startswith("application/xml")
    assert b"<Code>SlowDown</Code>" in reply.body
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert upstream_requests(setup.upstream).get(setup.path, 0) == before, "not forwarded"


def test_status_429_and_a_custom_body(setup: Setup) -> None:
    proxy.set_faults(
        setup.proxy,
        {"fault": "status", "status": 429, "times": 1},
        {
            "fault": "status",
            "status": 500,
            "body": '{"error": {"code": 500}}',
            "headers": {"Content-Type": "application/json"},
        },
    )
    first, second = fetch(setup.proxy, setup.path), fetch(setup.proxy, setup.path)
    assert first.status == 429
    assert b"<Code>SlowDown</Code>" in first.body
    assert (second.status, second.body) == (500, b'{"error": {"code": 500}}')
    assert second.headers["content-type"] == "application/json"


@pytest.mark.parametrize("offset", [0, 1000, 300_000, 900_000])
def test_reset_delivers_exactly_offset_bytes_then_a_connection_reset(
    setup: Setup, offset: int
) -> None:
    proxy.set_faults(setup.proxy, {"fault": "reset", "offset": offset})
    reply = fetch(setup.proxy, setup.path)
    assert reply.status == 200
    assert reply.headers["content-length"] == str(MiB)
    assert reply.body == setup.data[:offset]
    assert reply.error is ConnectionResetError


def test_reset_defaults_to_the_middle_of_the_body(setup: Setup) -> None:
    proxy.set_faults(setup.proxy, {"fault": "reset"})
    reply = fetch(setup.proxy, setup.path)
    assert (reply.body, reply.error) == (setup.data[: MiB // 2], ConnectionResetError)


def test_truncate_announces_the_full_length_sends_offset_bytes_then_eof(setup: Setup) -> None:
    proxy.set_faults(setup.proxy, {"fault": "truncate", "offset": 4096})
    reply = fetch(setup.proxy, setup.path)
    assert reply.status == 200
    assert reply.headers["content-length"] == str(MiB)
    assert reply.body == setup.data[:4096]
    assert reply.error is None, "a clean close (FIN), not a reset"


def test_truncate_of_a_chunked_answer_leaves_out_the_final_chunk(chunked_proxy: str) -> None:
    plain = fetch(chunked_proxy, "/x")
    assert plain.headers["transfer-encoding"] == "chunked"
    assert dechunk(plain.body) == (CHUNKED_BODY, True)
    proxy.set_faults(chunked_proxy, {"fault": "truncate", "offset": 25_000})
    reply = fetch(chunked_proxy, "/x")
    assert reply.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in reply.headers
    assert dechunk(reply.body) == (CHUNKED_BODY[:25_000], False)
    assert reply.error is None
    proxy.clear_faults(chunked_proxy)


def test_stall_sends_offset_bytes_then_nothing_and_ends_when_the_client_leaves(
    setup: Setup,
) -> None:
    proxy.set_faults(setup.proxy, {"fault": "stall", "offset": 2048, "times": 1})
    reply = fetch(setup.proxy, setup.path, timeout=0.5)
    assert reply.status == 200
    assert reply.headers["content-length"] == str(MiB)
    assert reply.body == setup.data[:2048]
    assert reply.error is TimeoutError
    # The client has gone: the stalled request ends, and the next one is served.
    assert fetch(setup.proxy, setup.path).body == setup.data
    assert proxy.wait_idle(setup.proxy) == 0


def test_stall_right_after_headers_and_before_them(setup: Setup) -> None:
    proxy.set_faults(
        setup.proxy,
        {"fault": "stall", "times": 1},
        {"fault": "stall", "before_headers": True, "times": 1},
    )
    after_headers = fetch(setup.proxy, setup.path, timeout=0.5)
    assert (after_headers.status, after_headers.body) == (200, b"")
    assert after_headers.error is TimeoutError
    before_headers = fetch(setup.proxy, setup.path, timeout=0.5)
    assert (before_headers.status, before_headers.error) == (0, TimeoutError)
    assert fetch(setup.proxy, setup.path).body == setup.data
    assert proxy.wait_idle(setup.proxy) == 0


def test_a_stall_with_seconds_ends_with_a_close(setup: Setup) -> None:
    proxy.set_faults(setup.proxy, {"fault": "stall", "offset": 10, "seconds": 0.1})
    reply = fetch(setup.proxy, setup.path)
    assert (reply.body, reply.error) == (setup.data[:10], None)


@pytest.mark.parametrize("offset", [None, 0, 12_345, MiB - 1])
def test_flip_changes_exactly_one_byte(setup: Setup, offset: int | None) -> None:
    rule: dict[str, object] = {"fault": "flip"}
    if offset is not None:
        rule["offset"] = offset
    proxy.set_faults(setup.proxy, rule)
    reply = fetch(setup.proxy, setup.path)
    assert (reply.status, reply.error, len(reply.body)) == (200, None, MiB)
    differ = [i for i in range(MiB) if reply.body[i] != setup.data[i]]
    where = MiB // 2 if offset is None else offset
    assert differ == [where]
    assert reply.body[where] == setup.data[where] ^ 0xFF


def test_flip_of_a_chunked_answer_defaults_to_its_middle(chunked_proxy: str) -> None:
    proxy.set_faults(chunked_proxy, {"fault": "flip"})
    body, complete = dechunk(fetch(chunked_proxy, "/x").body)
    proxy.clear_faults(chunked_proxy)
    assert complete
    middle = len(CHUNKED_BODY) // 2
    assert [i for i in range(len(body)) if body[i] != CHUNKED_BODY[i]] == [middle]


def test_latency_still_serves_and_counts(setup: Setup) -> None:
    proxy.set_faults(setup.proxy, {"fault": "latency", "seconds": 0.05})
    assert fetch(setup.proxy, setup.path).body == setup.data
    counts = proxy.counts(setup.proxy)
    assert counts["total"] == 1
    assert counts["faults"] == {"latency": 1}


def test_skip_then_times(setup: Setup) -> None:
    proxy.set_faults(setup.proxy, {"fault": "status", "skip": 1, "times": 2})
    statuses = [fetch(setup.proxy, setup.path, method="HEAD").status for _ in range(5)]
    assert statuses == [200, 503, 503, 200, 200]


def test_probability_is_deterministic_for_a_seed(setup: Setup) -> None:
    def faulted(seed: int) -> list[int]:
        proxy.set_faults(setup.proxy, {"fault": "status", "probability": 0.5, "seed": seed})
        return [
            i for i in range(30) if fetch(setup.proxy, setup.other, method="HEAD").status == 503
        ]

    first = faulted(7)
    assert 0 < len(first) < 30
    assert faulted(7) == first
    assert faulted(8) != first


def test_method_path_and_range_matching(setup: Setup) -> None:
    proxy.set_faults(
        setup.proxy,
        {"fault": "status", "status": 500, "method": "HEAD"},
        {"fault": "status", "status": 503, "path": r"/b\.bin$", "range": True},
        {"fault": "status", "status": 502, "path": r"/other\.bin$", "range": False},
    )
    ranged = {"Range": "bytes=0-9"}
    assert fetch(setup.proxy, setup.path, method="HEAD").status == 500
    assert fetch(setup.proxy, setup.path).status == 200
    assert fetch(setup.proxy, setup.path, headers=ranged).status == 503
    assert fetch(setup.proxy, setup.other, headers=ranged).status == 206
    assert fetch(setup.proxy, setup.other).status == 502


def test_the_first_rule_that_fires_applies(setup: Setup) -> None:
    proxy.set_faults(
        setup.proxy,
        {"fault": "status", "status": 500, "times": 1},
        {"fault": "status", "status": 503, "times": 1},
    )
    statuses = [fetch(setup.proxy, setup.other).status for _ in range(3)]
    assert statuses == [500, 503, 200]


def test_counters_count_faults_and_body_bytes_sent(setup: Setup) -> None:
    proxy.set_faults(
        setup.proxy,
        {"fault": "truncate", "offset": 4096, "times": 1},
        {"fault": "status", "status": 503, "times": 1},
    )
    replies = [fetch(setup.proxy, setup.path) for _ in range(3)]
    assert [len(r.body) for r in replies[:1] + replies[2:]] == [4096, MiB]
    counts = proxy.counts(setup.proxy)
    assert counts["faults"] == {"truncate": 1, "status": 1}
    assert counts["bytes_out"] == sum(len(r.body) for r in replies)
    assert counts["total"] == 3
    assert counts["paths"] == {f"GET {setup.path}": 3}
    # A reset zeroes the counters and the log; the rules and their progress stay.
    proxy.reset(setup.proxy)
    assert proxy.counts(setup.proxy) == {
        "total": 0,
        "methods": {},
        "paths": {},
        "faults": {},
        "bytes_out": 0,
        "bytes_in": 0,
        "peak_in_flight": 0,
    }
    assert proxy.request_log(setup.proxy) == []
    proxy.set_faults(setup.proxy, {"fault": "status"})
    proxy.reset(setup.proxy)
    assert fetch(setup.proxy, setup.path).status == 503


def test_the_log_records_each_request_but_no_credentials(setup: Setup) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    proxy.set_faults(setup.proxy, {"fault": "status", "status": 503, "method": "HEAD"})
    fetch(
        setup.proxy,
        setup.path,
        headers={"Range": "bytes=0-99", "If-Match": '"abc"', "Authorization": f"Bearer {secret}"},
    )
    fetch(setup.proxy, f"{setup.other}?generation=5&sig={secret}&X-Amz-Signature={secret}")
    fetch(
        setup.proxy,
        setup.other,
        method="HEAD",
        headers={"x-goog-if-generation-match": "7", "x-amz-security-token": secret},
    )
    log = proxy.request_log(setup.proxy)
    assert secret not in json.dumps(log)
    assert log == [
        {
            "method": "GET",
            "path": setup.path,
            "query": "",
            "range": "bytes=0-99",
            "if_match": '"abc"',
            "generation": None,
            "status": 412,  # the served file's ETag is not "abc"
            "fault": None,
            "bytes_out": len(b"precondition failed\n"),
        },
        {
            "method": "GET",
            "path": setup.other,
            "query": "generation=5&sig=REDACTED&X-Amz-Signature=REDACTED",
            "range": None,
            "if_match": None,
            "generation": "5",
            "status": 200,
            "fault": None,
            "bytes_out": len(setup.other_data),
        },
        {
            "method": "HEAD",
            "path": setup.other,
            "query": "",
            "range": None,
            "if_match": None,
            "generation": "7",
            "status": 503,
            "fault": "status",
            "bytes_out": 0,
        },
    ]


def test_delete_and_an_empty_list_clear_the_rules(setup: Setup) -> None:
    proxy.set_faults(setup.proxy, {"fault": "status"})
    assert fetch(setup.proxy, setup.other).status == 503
    proxy.clear_faults(setup.proxy)
    assert fetch(setup.proxy, setup.other).status == 200
    proxy.set_faults(setup.proxy, {"fault": "status"})
    proxy.set_faults(setup.proxy)
    assert fetch(setup.proxy, setup.other).status == 200


@pytest.mark.parametrize(
    "rule",
    [{"fault": "explode"}, {"fault": "status", "tims": 1}, {"fault": "reset", "path": "("}],
)
def test_a_bad_rule_is_refused(setup: Setup, rule: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="bad fault rules"):
        proxy.set_faults(setup.proxy, rule)


def test_a_location_into_the_upstream_is_rewritten_to_the_proxy(setup: Setup) -> None:
    reply = fetch(setup.proxy, f"/redirect?to={setup.upstream}/x/y")
    assert reply.status == 302
    assert reply.headers["location"] == f"{setup.proxy}/x/y"
