"""One download: HTTPS stream → temporary file → sha256 check → atomic rename.

The HTTP client is aiohttp: asyncio-native (no thread per download, cancellation is a task
cancel), streaming bodies with per-socket read timeouts (``sock_read`` is exactly an idle
timeout), TLS through the standard ``ssl`` module so a CA bundle replaces the system store,
and well kept (aio-libs, frequent releases, wide use). httpx would do as well; aiohttp was
chosen for its separate connect and idle-read timeouts and one dependency tree fewer.

What happens, in order (every failure removes the temporary file):

1. An existing regular file under the final name is hashed: the same sha256 completes the job
   at once, anything else fails (no image is ever overwritten).
2. A temporary file ``.<name>.<random>.part`` is created in the image directory (O_EXCL, 0600).
3. GET with ``Accept-Encoding: identity``; redirects are followed by hand (at most 10) and
   every target is checked like the URL itself, so https never turns into http or file.
4. The body streams to the file; writes and hashing run in a worker thread, one buffer
   behind the network. ``Progress``/``Bytes``/``TotalBytes``/``Rate`` are reported twice a second.
5. A dropped connection, an idle timeout, or HTTP 408/429/502/503/504 is retried with
   ``Range: bytes=N-`` (and ``If-Range`` when the server gave a validator), after
   ``Retry-After`` when the server sent one, else after an exponential backoff. Attempts
   that brought no new byte count against ``downloads.max_retries``; one that did resets it.
6. The size (when given) and the sha256 are checked; the file is fsynced, made 0644 and linked
   under its final name (``link`` fails if the name exists, so a racing download never
   overwrites), then the temporary name is removed and the directory fsynced.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import errno
import hashlib
import logging
import os
import re
import ssl
import stat
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from neurond import __version__
from neurond.core.images import ChecksumIndex
from neurond.downloads.request import DownloadRequest, check_url, display_url
from neurond.errors import (
    ChecksumMismatchError,
    DownloadFailedError,
    InvalidArgumentError,
    NeuronError,
)

_log = logging.getLogger("neurond.downloads")

REPORT_INTERVAL_S = 0.5  # API.md: Progress, Bytes and Rate change at most twice a second
BUFFER = 1 << 20  # bytes handed to the writer thread at once
MAX_REDIRECTS = 10
RETRYABLE_STATUS = frozenset({408, 429, 502, 503, 504})
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 300.0
MAX_ATTEMPTS = 1000  # even attempts that each bring a few bytes end somewhere
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class ProgressSink(Protocol):
    """What a download reports to (core.jobs.Job is one)."""

    def report(
        self,
        progress: float | None = None,
        *,
        done_bytes: int | None = None,
        total_bytes: int | None = None,
        rate: int | None = None,
        force: bool = False,
    ) -> None: ...


@dataclass(frozen=True)
class Settings:
    """The configuration one download runs with (a snapshot: a reload affects new jobs)."""

    image_dir: Path
    ca_bundle: str = ""
    allow_insecure_loopback: bool = False
    connect_timeout_s: float = 30.0
    idle_timeout_s: float = 60.0
    max_retries: int = 5
    state_dir: Path | None = None  # where the verified sha256 is recorded (ListImages)


class _Retry(Exception):
    """An attempt ended in a way worth another try (dropped, timed out, 503 …)."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


def ssl_context(ca_bundle: str) -> ssl.SSLContext:
    """Verification always on; a configured bundle replaces the system store."""
    if not ca_bundle:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as e:
        raise DownloadFailedError(
            f"The CA bundle {ca_bundle} (downloads.ca_bundle) cannot be loaded: {e}.",
            details={"ca_bundle": ca_bundle},
        ) from None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total or None) of ``bytes F-L/T``; None when it is not one."""
    m = _CONTENT_RANGE.fullmatch((value or "").strip())
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(BUFFER):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class _Progress:
    """Throttles reports to the sink and computes the rate over the last interval."""

    def __init__(self, sink: ProgressSink) -> None:
        self.sink = sink
        self.last_time = 0.0
        self.last_bytes = 0

    def update(self, done: int, total: int | None, *, final: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self.last_time
        if not final and elapsed < REPORT_INTERVAL_S:
            return
        rate = 0 if final or elapsed <= 0 else int(max(0, done - self.last_bytes) / elapsed)
        self.last_time, self.last_bytes = now, done
        self.sink.report(
            done / total if total else None,
            done_bytes=done,
            total_bytes=total or 0,
            rate=rate,
            force=True,  # throttled here already, with the same interval
        )

    async def finish(self, done: int) -> None:
        # The last report waits its turn: Bytes changes at most twice a second, even at the end.
        await asyncio.sleep(max(0.0, self.last_time + REPORT_INTERVAL_S - time.monotonic()))
        self.update(done, done, final=True)


class Download:
    """One download's state: the temporary file, the hash so far, what the server told."""

    def __init__(self, request: DownloadRequest, settings: Settings, sink: ProgressSink) -> None:
        self.request = request
        self.settings = settings
        self.progress = _Progress(sink)
        self.final = settings.image_dir / request.filename
        self.temp: Path | None = None
        self._fd = -1
        self._hash = hashlib.sha256()
        self.received = 0  # bytes in the temporary file
        self.total: int | None = request.size
        self.validator: str | None = None  # ETag or Last-Modified for If-Range
        self._pending: asyncio.Future[None] | None = None
        self.attempts = 0

    # ---- facts for errors --------------------------------------------------------------

    def _details(self, **more: Any) -> dict[str, Any]:
        return {
            "url": self.request.shown_url,
            "filename": self.request.filename,
            "bytes": self.received,
            **more,
        }

    def _failed(self, reason: str, **more: Any) -> DownloadFailedError:
        return DownloadFailedError(
            f"Downloading {self.request.shown_url} failed: {reason} (after {self.received} bytes).",
            details=self._details(**more),
        )

    # ---- the whole job -----------------------------------------------------------------

    async def run(self) -> None:
        if await self._already_there():
            return
        try:
            # In the loop, not a thread: a cancel must never miss a file being created.
            self._open_temp()
            await self._transfer()
            await self._flush()
            self._verify()
            # Held in _pending: a cancel waits for it in _cleanup before closing the fd.
            self._pending = asyncio.ensure_future(asyncio.to_thread(self._commit))
            await self._flush()
        finally:
            await self._cleanup()
        await self._record()
        size = self.received
        await self.progress.finish(size)
        _log.info(
            "Downloaded %s to %s (%d bytes)",
            self.request.shown_url,
            self.final,
            size,
            extra={"fields": {"NEUROND_URL": self.request.shown_url, "NEUROND_BYTES": size}},
        )

    async def _already_there(self) -> bool:
        """True when the final name already holds this content; fails when it holds another."""
        try:
            st = os.lstat(self.final)
        except FileNotFoundError:
            return False
        except OSError as e:
            what = f"{self.final} cannot be examined: {e.strerror}"
            raise self._failed(what, errno=e.errno) from None
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgumentError(
                f"{self.final} exists and is not a regular file; choose another filename.",
                details=self._details(),
            )
        digest, size = await asyncio.to_thread(_hash_file, self.final)
        if digest != self.request.sha256:
            raise InvalidArgumentError(
                f"{self.final} already exists with different content (sha256 {digest}); "
                "delete it or choose another filename.",
                details=self._details(actual_sha256=digest),
            )
        self.received = size
        await self._record()
        await self.progress.finish(size)
        return True

    async def _record(self) -> None:
        """Remember the verified sha256 for ListImages (never fails the download)."""
        state_dir = self.settings.state_dir
        if state_dir is None:
            return

        def record() -> None:
            try:
                st = os.stat(self.final)
            except OSError:
                return
            ChecksumIndex(state_dir).record(self.request.filename, self.request.sha256, st)

        await asyncio.to_thread(record)

    def _open_temp(self) -> None:
        directory = self.settings.image_dir
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # mkstemp: O_CREAT|O_EXCL, a random unique name, mode 0600; the name's stem is
            # cut to 200 bytes so ".stem.XXXXXXXX.part" stays within NAME_MAX.
            stem = self.request.filename.encode()[:200].decode(errors="ignore")
            fd, name = tempfile.mkstemp(dir=directory, prefix=f".{stem}.", suffix=".part")
        except OSError as e:
            raise self._failed(
                f"cannot create a file in {directory}: {e.strerror}", errno=e.errno
            ) from None
        self._fd, self.temp = fd, Path(name)

    # ---- network -----------------------------------------------------------------------

    async def _transfer(self) -> None:
        s = self.settings
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=s.connect_timeout_s,  # TCP and TLS handshake
            sock_connect=s.connect_timeout_s,
            sock_read=s.idle_timeout_s,
        )
        connector = aiohttp.TCPConnector(ssl=ssl_context(s.ca_bundle), limit=1)
        # trust_env=False: no proxy or netrc from the daemon's environment.
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, trust_env=False
        ) as session:
            failures = 0
            delay = BACKOFF_FIRST_S
            while True:
                self.attempts += 1
                before = self.received
                try:
                    await self._attempt(session)
                    return
                except _Retry as r:
                    if self.received > before:
                        failures, delay = 0, BACKOFF_FIRST_S
                    failures += 1
                    if failures > s.max_retries or self.attempts >= MAX_ATTEMPTS:
                        raise self._failed(
                            f"{r.reason}; gave up after {self.attempts} attempts",
                            attempts=self.attempts,
                        ) from None
                    wait = r.delay if r.delay is not None else delay
                    if wait > RETRY_AFTER_MAX_S:
                        raise self._failed(
                            f"{r.reason}; the server asks to retry after {wait:.0f} s",
                            attempts=self.attempts,
                        ) from None
                    _log.info(
                        "Download of %s interrupted (%s) at %d bytes; retrying in %.1f s",
                        self.request.shown_url,
                        r.reason,
                        self.received,
                        wait,
                        extra={"fields": {"NEUROND_URL": self.request.shown_url}},
                    )
                    self.progress.update(self.received, self.total)
                    await asyncio.sleep(wait)
                    delay = min(BACKOFF_MAX_S, delay * 2)

    async def _attempt(self, session: aiohttp.ClientSession) -> None:
        headers = {"Accept-Encoding": "identity", "User-Agent": f"neurond/{__version__}"}
        if self.received:
            headers["Range"] = f"bytes={self.received}-"
            if self.validator:
                headers["If-Range"] = self.validator
        url = self.request.url
        try:
            for _ in range(MAX_REDIRECTS + 1):
                async with session.get(url, headers=headers, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308):
                        url = self._redirect(url, resp)
                        continue
                    await self._response(resp)
                    return
            raise self._failed(f"more than {MAX_REDIRECTS} redirects")
        except aiohttp.ClientConnectorCertificateError as e:
            raise self._failed(
                f"the server's TLS certificate is not trusted ({e.certificate_error})",
                kind="tls",
            ) from None
        except aiohttp.ClientSSLError as e:
            raise self._failed(f"TLS failed ({e})", kind="tls") from None
        except aiohttp.ClientConnectorDNSError as e:
            raise _Retry(f"the host name does not resolve ({e.os_error.strerror})") from None
        except aiohttp.ClientConnectorError as e:
            raise _Retry(f"cannot connect ({e.os_error.strerror or e.os_error})") from None
        except aiohttp.ConnectionTimeoutError:
            raise _Retry(
                f"connecting timed out after {self.settings.connect_timeout_s:g} s"
            ) from None
        except (aiohttp.ServerTimeoutError, TimeoutError):
            raise _Retry(
                f"the connection timed out: no data for {self.settings.idle_timeout_s:g} s"
            ) from None
        except aiohttp.ClientPayloadError:
            raise _Retry("the connection dropped mid-transfer") from None
        except aiohttp.ServerDisconnectedError:
            raise _Retry("the server closed the connection") from None
        except aiohttp.ClientError as e:
            raise _Retry(f"the connection failed ({type(e).__name__}: {e})") from None

    def _redirect(self, current: str, resp: aiohttp.ClientResponse) -> str:
        location = resp.headers.get("Location", "")
        if not location:
            raise self._failed(f"HTTP {resp.status} without a Location", status=resp.status)
        target = urllib.parse.urljoin(current, location)
        try:
            return check_url(target, allow_insecure_loopback=self.settings.allow_insecure_loopback)
        except InvalidArgumentError as e:
            raise self._failed(
                f"the server redirects to {display_url(target)}, which is refused: {e.message}",
                status=resp.status,
            ) from None

    async def _response(self, resp: aiohttp.ClientResponse) -> None:
        status = resp.status
        if status in RETRYABLE_STATUS:
            raise _Retry(
                f"HTTP {status} {resp.reason or ''}".strip(),
                parse_retry_after(resp.headers.get("Retry-After")),
            )
        if status == 200:
            if self.received:
                # The server ignored Range (or If-Range failed): start again from the first byte.
                await self._restart()
            length = resp.content_length
            self._set_total(length)
            self.validator = self._validator(resp)
        elif status == 206 and self.received:
            parsed = parse_content_range(resp.headers.get("Content-Range"))
            if parsed is None or parsed[0] != self.received:
                raise self._failed(
                    f"the server answered a resume with the wrong range "
                    f"({resp.headers.get('Content-Range', 'none')!r})",
                    status=status,
                )
            self._set_total(parsed[2])
        else:
            raise self._failed(
                f"the server answered HTTP {status} {resp.reason or ''}".strip(), status=status
            )
        self.progress.update(self.received, self.total)
        await self._stream(resp)

    @staticmethod
    def _validator(resp: aiohttp.ClientResponse) -> str | None:
        etag = resp.headers.get("ETag")
        if etag and not etag.startswith("W/"):
            return etag
        return resp.headers.get("Last-Modified")

    def _set_total(self, total: int | None) -> None:
        size = self.request.size
        if total is not None and size is not None and total != size:
            longer = "more" if total > size else "fewer"
            raise self._failed(
                f"the server announces {total} bytes, {longer} than the expected size {size}",
                announced=total,
                size=size,
            )
        if total is not None:
            self.total = total

    async def _stream(self, resp: aiohttp.ClientResponse) -> None:
        buf = bytearray()
        try:
            async for chunk in resp.content.iter_any():
                buf += chunk
                limit = self.request.size
                if limit is not None and self.received + len(buf) > limit:
                    buf.clear()
                    raise self._failed(
                        f"the server sends more than the expected size {limit}", size=limit
                    )
                if len(buf) >= BUFFER:
                    await self._write(bytes(buf))
                    buf.clear()
                    self.progress.update(self.received, self.total)
        except (aiohttp.ClientError, TimeoutError):
            # What arrived before a drop or a timeout is good data: keep it for the resume.
            if buf:
                await self._write(bytes(buf))
            raise
        if buf:
            await self._write(bytes(buf))
        await self._flush()
        if self.total is not None and self.received < self.total:
            raise _Retry("the connection ended early")

    # ---- disk --------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        """Hand ``data`` to the writer thread once the previous buffer is written."""
        await self._flush()
        self.received += len(data)  # counted now; a failed write fails the whole job
        self._pending = asyncio.ensure_future(asyncio.to_thread(self._write_sync, data))

    async def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    def _write_sync(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            full = e.errno == errno.ENOSPC
            what = "the disk is full" if full else f"writing failed: {e.strerror}"
            raise self._failed(
                f"{what} ({errno.errorcode.get(e.errno or 0, e.errno)}) in "
                f"{self.settings.image_dir}",
                errno=e.errno,
            ) from None
        self._hash.update(data)

    async def _restart(self) -> None:
        await self._flush()

        def truncate() -> None:
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)

        await asyncio.to_thread(truncate)
        self._hash = hashlib.sha256()
        self.received = 0

    def _verify(self) -> None:
        size = self.request.size
        if size is not None and self.received != size:
            raise self._failed(f"got {self.received} bytes, expected {size}", size=size)
        digest = self._hash.hexdigest()
        if digest != self.request.sha256:
            raise ChecksumMismatchError(
                f"The file downloaded from {self.request.shown_url} ({self.received} bytes) has "
                f"sha256 {digest}, not the expected {self.request.sha256}; it was deleted.",
                details=self._details(expected_sha256=self.request.sha256, actual_sha256=digest),
            )

    def _commit(self) -> None:
        assert self.temp is not None
        try:
            os.fsync(self._fd)
            os.fchmod(self._fd, 0o644)
            try:
                os.link(self.temp, self.final)  # fails if the name exists: never overwrites
            except FileExistsError:
                digest, _ = _hash_file(self.final)
                if digest != self.request.sha256:
                    raise InvalidArgumentError(
                        f"{self.final} appeared during the download with different content; "
                        "delete it or choose another filename.",
                        details=self._details(actual_sha256=digest),
                    ) from None
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                # A file system without hard links: check, then rename (a narrow race).
                if self.final.exists():
                    raise InvalidArgumentError(
                        f"{self.final} appeared during the download; choose another filename.",
                        details=self._details(),
                    ) from None
                os.rename(self.temp, self.final)
                self.temp = None
            dir_fd = os.open(self.settings.image_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if self.temp is not None:
                    os.unlink(self.temp)
                    self.temp = None
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise self._failed(
                f"cannot put the file in place as {self.final}: {e.strerror}", errno=e.errno
            ) from None

    async def _cleanup(self) -> None:
        # A write still running in the worker thread must end before its fd is closed:
        # a closed number can be reused by another file at once.
        pending, self._pending = self._pending, None
        if pending is not None:
            await asyncio.wait({pending})
            if not pending.cancelled():
                pending.exception()  # retrieved: the job already ends with another error
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self.temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)
            self.temp = None


async def download(request: DownloadRequest, settings: Settings, sink: ProgressSink) -> None:
    """Run one download to completion; NeuronError on failure, cancel leaves nothing behind."""
    try:
        await Download(request, settings, sink).run()
    except NeuronError:
        raise
    except OSError as e:
        raise DownloadFailedError(
            f"Downloading {request.shown_url} failed: {e.strerror or e}.",
            details={"url": request.shown_url, "errno": e.errno},
        ) from None
