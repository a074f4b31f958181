"""A loopback HTTPS file server for the download tests and bench/download.py.

It runs aiohttp.web in its own thread and event loop (so a synchronous script and any
test's loop can use it) and serves deterministic data that is never stored: byte ``o`` of
``/NAME?size=S&seed=K`` is byte ``o % 1 MiB`` of a 1 MiB block seeded by K, whose first
8 bytes are replaced by the block number (so no two blocks are alike). Query parameters
shape the answer:

  size=N        bytes in the file (default 1 MiB)
  seed=K        which data
  cl=0          no Content-Length (chunked transfer encoding)
  ranges=0      ignore Range (always answer 200 with the whole file)
  drop=a,b,...  close the connection when the offset first reaches each fraction (once each)
  stall=f       stop sending (but keep the connection) at fraction f, on every request
  location=URL  answer 302 Found with this Location
  status=N      answer HTTP N with a short body
  busy=N        answer the first N requests 503 with ``Retry-After: <retry_after>``
  retry_after=S the Retry-After value (default 1)
  rate=B        send at most B bytes per second
  extra=N       send N bytes more than ``size`` (announced too, when cl is on)

``requests`` records every request (path with query, and headers) in order.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web

BLOCK = 1 << 20
WRITE = 256 << 10


@functools.lru_cache(maxsize=8)
def _base(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK)


def _block(index: int, seed: int) -> bytes:
    return index.to_bytes(8, "big") + _base(seed)[8:]


def data(offset: int, length: int, seed: int = 0) -> bytes:
    """Bytes [offset, offset+length) of the file with this seed."""
    out = bytearray()
    while length > 0:
        index, start = divmod(offset, BLOCK)
        piece = _block(index, seed)[start : start + length]
        out += piece
        offset += len(piece)
        length -= len(piece)
    return bytes(out)


@functools.lru_cache(maxsize=16)
def sha256_of(size: int, seed: int = 0) -> str:
    h = hashlib.sha256()
    for index in range(size // BLOCK):
        h.update(_block(index, seed))
    if size % BLOCK:
        h.update(_block(size // BLOCK, seed)[: size % BLOCK])
    return h.hexdigest()


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    time: float = field(default_factory=time.monotonic)


class FileServer:
    """The server; ``with FileServer(ca) as s: s.url("win.iso", size=…)``.

    ``ca`` signs the server certificate (for 127.0.0.1 and localhost); ``tls=False`` serves
    plain HTTP.
    """

    def __init__(self, ca: trustme.CA | None = None, *, tls: bool = True) -> None:
        self.ca = ca or trustme.CA()
        self.tls = tls
        self.requests: list[Seen] = []
        self.port = 0
        self._dropped: set[tuple[str, float]] = set()
        self._busy: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    # -- control ---------------------------------------------------------------------------

    def url(self, name: str, host: str = "127.0.0.1", **params: Any) -> str:
        scheme = "https" if self.tls else "http"
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"{scheme}://{host}:{self.port}/{name}" + (f"?{query}" if query else "")

    def write_ca(self, path: Path) -> Path:
        self.ca.cert_pem.write_to_path(str(path))
        return path

    def start(self) -> FileServer:
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the file server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the server thread -----------------------------------------------------------------

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/{name}", self._handle)
        # handler_cancellation: a stalled handler ends when the client goes or we stop.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1
        )
        await self._runner.setup()
        context: ssl.SSLContext | None = None
        if self.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        await self._stop.wait()
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Seen(request.path_qs, dict(request.headers)))
        q = request.query
        size = int(q.get("size", BLOCK))
        seed = int(q.get("seed", 0))
        key = request.path_qs
        if "location" in q:
            raise web.HTTPFound(q["location"])
        if "status" in q:
            return web.Response(status=int(q["status"]), text="no such file\n")
        busy = int(q.get("busy", 0))
        if busy and self._busy.get(key, 0) < busy:
            self._busy[key] = self._busy.get(key, 0) + 1
            return web.Response(
                status=503, text="busy\n", headers={"Retry-After": q.get("retry_after", "1")}
            )
        length = size + int(q.get("extra", 0))
        start = 0
        rng = request.headers.get("Range", "")
        resp = web.StreamResponse()
        if rng.startswith("bytes=") and rng.endswith("-") and q.get("ranges") != "0":
            start = int(rng[6:-1])
            resp.set_status(206)
            resp.headers["Content-Range"] = f"bytes {start}-{length - 1}/{length}"
        resp.headers["Accept-Ranges"] = "bytes"
        resp.headers["ETag"] = f'"{size}-{seed}"'
        if q.get("cl", "1") != "0":
            resp.content_length = length - start
        else:
            resp.enable_chunked_encoding()
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)

        drops = sorted(float(x) * size for x in q["drop"].split(",")) if "drop" in q else []
        point = next((p for p in drops if int(p) > start and (key, p) not in self._dropped), None)
        stop_at = None if point is None else int(point)
        stall_at = int(float(q["stall"]) * size) if "stall" in q else None
        rate = int(q.get("rate", 0))
        offset = start
        began = time.monotonic()
        while offset < length:
            n = min(WRITE, length - offset)
            if stop_at is not None:
                n = min(n, stop_at - offset)
            if stall_at is not None and offset >= stall_at:
                await asyncio.sleep(3600)  # cancelled when the client gives up or we stop
            if stall_at is not None and offset < stall_at:
                n = min(n, stall_at - offset)
            if n <= 0:
                break
            await resp.write(data(offset, n, seed))
            offset += n
            if rate:
                ahead = (offset - start) / rate - (time.monotonic() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        if stop_at is not None and offset >= stop_at:
            assert point is not None
            self._dropped.add((key, point))
            transport = request.transport
            if transport is not None:
                transport.abort()  # a dropped connection: no more bytes, no clean end
            raise asyncio.CancelledError
        await resp.write_eof()
        return resp


def _serve_main() -> None:
    """``python -m tests.download_server CA_PATH``: serve until killed; prints the port."""
    import signal
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.download_server CA_PATH")
    with FileServer() as server:
        server.write_ca(Path(sys.argv[1]))
        print(server.port, flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    import signal as _signal

    _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGTERM, _signal.SIGINT})
    _serve_main()
