"""DownloadImage through D-Bus against a loopback HTTPS server (tests/download_server.py).

The server's certificates come from a test CA made by trustme; the daemon's
``downloads.ca_bundle`` points at that CA, so verification stays on exactly as in production.
Timeouts and retries are shortened by config so failure paths take seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from dbus_fast import Variant

from tests.bus.conftest import ERR, JOB, MANAGER, MANAGER_PATH, CallFailed, Client
from tests.download_server import FileServer, sha256_of
from tests.harness import Daemon

MiB = 1 << 20
ZERO_SHA = "0" * 64


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server(ca: trustme.CA) -> Iterator[FileServer]:
    with FileServer(ca) as s:
        yield s


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def make_daemon(start_daemon: Callable[..., Daemon], ca_file: Path) -> Callable[..., Daemon]:
    """neurond trusting the test CA; keyword arguments override [downloads] keys."""

    def make(storage: dict[str, Any] | None = None, **downloads: Any) -> Daemon:
        section = {
            "ca_bundle": str(ca_file),
            "idle_timeout_s": 5,
            "connect_timeout_s": 5,
            "max_retries": 3,
            **downloads,
        }
        config: dict[str, Any] = {"downloads": section}
        if storage:
            config["storage"] = storage
        return start_daemon(config=config)

    return make


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon()


async def download(client: Client, url: str, **options: Variant) -> str:
    (path,) = await client.call(
        MANAGER_PATH, MANAGER, "DownloadImage", "sa{sv}", [url, dict(options)]
    )
    assert isinstance(path, str)
    return path


def sha(value: str) -> Variant:
    return Variant("s", value)


async def props(client: Client, path: str) -> dict[str, Any]:
    (values,) = await client.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", [JOB])
    return {k: v.value for k, v in values.items()}


async def wait_state(
    client: Client, path: str, states: frozenset[str], timeout: float = 60.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        p = await props(client, path)
        if p["State"] in states:
            return p
        if time.monotonic() > deadline:
            raise AssertionError(f"job {path} still {p['State']} after {timeout} s: {p}")
        await asyncio.sleep(0.05)


FINISHED = frozenset({"completed", "failed", "cancelled"})


async def finish(client: Client, path: str, timeout: float = 60.0) -> dict[str, Any]:
    return await wait_state(client, path, FINISHED, timeout)


def files(daemon: Daemon) -> list[str]:
    """Everything in the image directory, hidden temporary files included."""
    return sorted(p.name for p in daemon.image_dir.iterdir())


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


# -- success ---------------------------------------------------------------------------------


async def test_200_mb_download_completes_with_monotonic_progress(
    daemon: Daemon, client: Client, server: FileServer
) -> None:
    size = 200 * MiB
    started = time.monotonic()
    job = await download(client, server.url("big.iso", size=size), sha256=sha(sha256_of(size)))
    p = await finish(client, job, timeout=120)
    elapsed = time.monotonic() - started
    assert p["State"] == "completed", p
    assert p["Operation"] == "download"
    assert p["Objects"] == []
    assert (p["Progress"], p["Bytes"], p["TotalBytes"], p["Rate"]) == (1.0, size, size, 0)
    assert files(daemon) == ["big.iso"]
    assert file_sha(daemon.image_dir / "big.iso") == sha256_of(size)
    assert (daemon.image_dir / "big.iso").stat().st_mode & 0o777 == 0o644

    changes = client.changes(job)
    progress = [c["Progress"] for c in changes if "Progress" in c]
    done = [c["Bytes"] for c in changes if "Bytes" in c]
    assert progress == sorted(progress) and done == sorted(done)
    assert done[-1] == size
    # At most twice a second (plus the first report): a slow machine only spaces them more.
    assert len(done) <= 2 * elapsed + 2, (len(done), elapsed)


async def test_download_without_content_length(
    daemon: Daemon, client: Client, server: FileServer
) -> None:
    size = 8 * MiB + 123
    url = server.url("nolength.img", size=size, cl=0)
    job = await download(client, url, sha256=sha(sha256_of(size)))
    p = await finish(client, job)
    assert p["State"] == "completed", p
    assert (p["Bytes"], p["TotalBytes"]) == (size, size)
    assert file_sha(daemon.image_dir / "nolength.img") == sha256_of(size)
    assert files(daemon) == ["nolength.img"]


async def test_filename_option_and_size(daemon: Daemon, client: Client, server: FileServer) -> None:
    size = 3 * MiB
    job = await download(
        client,
        server.url("whatever", size=size, seed=3),
        sha256=sha(sha256_of(size, 3).upper()),
        filename=Variant("s", "virtio-win.iso"),
        size=Variant("t", size),
    )
    assert (await finish(client, job))["State"] == "completed"
    assert files(daemon) == ["virtio-win.iso"]


async def test_longest_filename(daemon: Daemon, client: Client, server: FileServer) -> None:
    name = "é" * 127  # 254 bytes: the temporary name must still fit in NAME_MAX
    job = await download(
        client, server.url("x.iso"), sha256=sha(sha256_of(MiB)), filename=Variant("s", name)
    )
    assert (await finish(client, job))["State"] == "completed"
    assert files(daemon) == [name]


@pytest.mark.parametrize("cl", [1, 0], ids=["content-length", "chunked"])
async def test_drops_at_30_60_90_percent_resume(
    daemon: Daemon, client: Client, server: FileServer, cl: int
) -> None:
    size = 24 * MiB
    url = server.url(f"flaky{cl}.iso", size=size, seed=cl, cl=cl, drop="0.3,0.6,0.9")
    before = len(server.requests)
    job = await download(client, url, sha256=sha(sha256_of(size, cl)))
    p = await finish(client, job)
    assert p["State"] == "completed", p
    assert file_sha(daemon.image_dir / f"flaky{cl}.iso") == sha256_of(size, cl)
    ranges = [r.headers.get("Range") for r in server.requests[before:]]
    # Each resume starts where the daemon's data ends: at most the drop point (an aborted
    # connection loses what was in flight), past the previous one.
    assert len(ranges) == 4 and ranges[0] is None, ranges
    starts = [int(r.removeprefix("bytes=").removesuffix("-")) for r in ranges[1:] if r]
    assert len(starts) == 3
    for start, low, high in zip(starts, (0, 0.3, 0.6), (0.3, 0.6, 0.9), strict=True):
        assert low * size < start <= high * size, starts
    progress = [c["Bytes"] for c in client.changes(job) if "Bytes" in c]
    assert progress == sorted(progress)
    assert files(daemon) == [f"flaky{cl}.iso"]


async def test_retry_after_is_honoured(daemon: Daemon, client: Client, server: FileServer) -> None:
    size = MiB
    url = server.url("busy.iso", size=size, busy=1, retry_after=1)
    before = len(server.requests)
    job = await download(client, url, sha256=sha(sha256_of(size)))
    assert (await finish(client, job))["State"] == "completed"
    first, second = server.requests[before:]
    assert second.time - first.time >= 0.9


async def test_existing_file_with_same_content_completes_at_once(
    daemon: Daemon, client: Client, server: FileServer
) -> None:
    size = 2 * MiB
    url = server.url("same.iso", size=size, seed=7)
    first = await download(client, url, sha256=sha(sha256_of(size, 7)))
    assert (await finish(client, first))["State"] == "completed"
    before = len(server.requests)
    again = await download(client, url, sha256=sha(sha256_of(size, 7)))
    p = await finish(client, again)
    assert p["State"] == "completed"
    assert p["Bytes"] == size
    assert len(server.requests) == before  # nothing fetched

    other = await download(client, url, sha256=sha(ZERO_SHA))
    p = await finish(client, other)
    assert (p["State"], p["ErrorName"]) == ("failed", ERR + "InvalidArgument"), p
    assert file_sha(daemon.image_dir / "same.iso") == sha256_of(size, 7)  # not overwritten


async def test_redirects_are_followed_and_checked(
    daemon: Daemon, client: Client, server: FileServer
) -> None:
    size = MiB
    target = server.url("target.bin", size=size, seed=5)
    hop = server.url("hop.iso", location=urllib.parse.quote(target, safe=""))
    job = await download(client, hop, sha256=sha(sha256_of(size, 5)))
    assert (await finish(client, job))["State"] == "completed"
    assert files(daemon) == ["hop.iso"]  # the name comes from the URL asked for

    for bad in (f"http://127.0.0.1:{server.port}/x.iso", "file:///etc/passwd"):
        hop = server.url("bad-hop.iso", location=urllib.parse.quote(bad, safe=""))
        job = await download(client, hop, sha256=sha(ZERO_SHA))
        p = await finish(client, job)
        assert (p["State"], p["ErrorName"]) == ("failed", ERR + "DownloadFailed"), p
        assert "redirects to" in p["ErrorMessage"]
    assert files(daemon) == ["hop.iso"]


# -- failures --------------------------------------------------------------------------------


async def test_wrong_checksum_fails_and_leaves_nothing(
    daemon: Daemon, client: Client, server: FileServer
) -> None:
    job = await download(client, server.url("bad.iso", size=2 * MiB), sha256=sha(ZERO_SHA))
    p = await finish(client, job)
    assert (p["State"], p["ErrorName"]) == ("failed", ERR + "ChecksumMismatch"), p
    assert ZERO_SHA in p["ErrorMessage"] and sha256_of(2 * MiB) in p["ErrorMessage"]
    assert files(daemon) == []


@pytest.mark.parametrize("status", [404, 500])
async def test_http_error_status(
    daemon: Daemon, client: Client, server: FileServer, status: int
) -> None:
    job = await download(client, server.url("missing.iso", status=status), sha256=sha(ZERO_SHA))
    p = await finish(client, job)
    assert (p["State"], p["ErrorName"]) == ("failed", ERR + "DownloadFailed"), p
    assert f"HTTP {status}" in p["ErrorMessage"]
    assert f"127.0.0.1:{server.port}/missing.iso" in p["ErrorMessage"]
    assert "?…" in p["ErrorMessage"]  # the query is not shown
    assert "after 0 bytes" in p["ErrorMessage"]
    assert files(daemon) == []
    # The journal entry carries the facts as fields (console target: key=value).
    await client.wait_for(lambda: f"status={status}" in daemon.stderr_text())
    assert "code=DOWNLOAD_FAILED" in daemon.stderr_text()


async def test_untrusted_certificate(daemon: Daemon, client: Client) -> None:
    with FileServer(trustme.CA()) as stranger:
        job = await download(client, stranger.url("x.iso"), sha256=sha(ZERO_SHA))
        p = await finish(client, job)
        assert len(stranger.requests) == 0  # the handshake failed before any request
    assert (p["State"], p["ErrorName"]) == ("failed", ERR + "DownloadFailed"), p
    assert "certificate" in p["ErrorMessage"]
    assert files(daemon) == []


async def test_stalled_server_times_out(
    make_daemon: Callable[..., Daemon], client: Client, server: FileServer
) -> None:
    daemon = make_daemon(idle_timeout_s=1, max_retries=1)
    job = await download(
        client, server.url("stall.iso", size=4 * MiB, stall=0.5), sha256=sha(ZERO_SHA)
    )
    p = await finish(client, job, timeout=30)
    assert (p["State"], p["ErrorName"]) == ("failed", ERR + "DownloadFailed"), p
    assert "no data for 1 s" in p["ErrorMessage"]
    assert f"after {2 * MiB} bytes" in p["ErrorMessage"]
    assert files(daemon) == []


@pytest.mark.parametrize("cl", [1, 0], ids=["announced", "streamed"])
async def test_more_than_size(daemon: Daemon, client: Client, server: FileServer, cl: int) -> None:
    url = server.url(f"long{cl}.iso", size=MiB, extra=70000, cl=cl)
    job = await download(client, url, sha256=sha(sha256_of(MiB)), size=Variant("t", MiB))
    p = await finish(client, job)
    assert (p["State"], p["ErrorName"]) == ("failed", ERR + "DownloadFailed"), p
    assert "than the expected size" in p["ErrorMessage"]
    assert files(daemon) == []


async def test_cancel_mid_way_removes_the_temporary_file(
    daemon: Daemon, client: Client, server: FileServer
) -> None:
    url = server.url("slow.iso", size=64 * MiB, rate=4 * MiB)
    job = await download(client, url, sha256=sha(ZERO_SHA))
    await client.wait_for(lambda: any(c.get("Bytes", 0) > 0 for c in client.changes(job)), 20)
    assert any(name.endswith(".part") for name in files(daemon))
    await client.call(job, JOB, "Cancel")
    p = await finish(client, job)
    assert (p["State"], p["ErrorName"]) == ("cancelled", ERR + "Cancelled"), p
    assert files(daemon) == []


async def test_max_parallel_queues_the_rest(
    make_daemon: Callable[..., Daemon], client: Client, server: FileServer
) -> None:
    daemon = make_daemon(max_parallel=1)
    slow = {"size": 64 * MiB, "rate": 2 * MiB}
    first = await download(client, server.url("q1.iso", **slow), sha256=sha(ZERO_SHA))
    second = await download(client, server.url("q2.iso", **slow), sha256=sha(ZERO_SHA))
    third = await download(client, server.url("q3.iso", **slow), sha256=sha(ZERO_SHA))
    await wait_state(client, first, frozenset({"running"}))
    assert (await props(client, second))["State"] == "queued"
    await client.call(third, JOB, "Cancel")  # cancelled while queued
    assert (await finish(client, third))["State"] == "cancelled"
    await client.call(first, JOB, "Cancel")
    assert (await finish(client, first))["State"] == "cancelled"
    await wait_state(client, second, frozenset({"running"}))
    await client.call(second, JOB, "Cancel")
    assert (await finish(client, second))["State"] == "cancelled"
    assert files(daemon) == []


def _mount_tmpfs(path: Path, size: str) -> bool:
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


async def test_full_disk(
    make_daemon: Callable[..., Daemon],
    client: Client,
    server: FileServer,
    tmp_path: Path,
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    if not _mount_tmpfs(small, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        make_daemon(storage={"image_dir": str(small)})
        url = server.url("huge.iso", size=8 * MiB)
        job = await download(client, url, sha256=sha(sha256_of(8 * MiB)))
        p = await finish(client, job)
        assert (p["State"], p["ErrorName"]) == ("failed", ERR + "DownloadFailed"), p
        assert "disk is full" in p["ErrorMessage"] and "ENOSPC" in p["ErrorMessage"]
        assert list(small.iterdir()) == []
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(small)], check=False)


# -- refused before anything is fetched ------------------------------------------------------

HOSTILE_URLS = [
    "file:///etc/passwd",
    "ftp://127.0.0.1/x.iso",
    "https://user:secret@127.0.0.1:{port}/x.iso",
    "https://user@127.0.0.1:{port}/x.iso",
    "http://127.0.0.1:{port}/x.iso",  # loopback, but allow_insecure_loopback is off
    "http://example.org/x.iso",
    "https://127.0.0.1:{port}/",  # no file name in the URL
    "https://127.0.0.1:{port}/x y.iso",
    "https://127.0.0.1:{port}\\@evil/x.iso",
    "javascript:alert(1)",
    "",
]
# NUL cannot travel in a D-Bus string at all (the bus refuses the message); the unit tests
# cover it in the checker.
HOSTILE_NAMES = ["a/b.iso", "../x.iso", "..", ".hidden.iso", "x" * 300, "x\n.iso", "x\x7f"]


@pytest.mark.parametrize("url", HOSTILE_URLS)
async def test_hostile_urls_are_refused(
    daemon: Daemon, client: Client, server: FileServer, url: str
) -> None:
    before = len(server.requests)
    with pytest.raises(CallFailed) as e:
        await download(client, url.format(port=server.port), sha256=sha(ZERO_SHA))
    assert e.value.name == ERR + "InvalidArgument", e.value
    assert "secret" not in e.value.text
    await asyncio.sleep(0.2)
    assert len(server.requests) == before
    assert files(daemon) == []


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_hostile_filenames_are_refused(
    daemon: Daemon, client: Client, server: FileServer, name: str
) -> None:
    before = len(server.requests)
    with pytest.raises(CallFailed) as e:
        await download(
            client, server.url("x.iso"), sha256=sha(ZERO_SHA), filename=Variant("s", name)
        )
    assert e.value.name == ERR + "InvalidArgument", e.value
    assert len(server.requests) == before
    assert files(daemon) == []


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"sha256": Variant("s", "abc")},
        {"sha256": Variant("s", "g" * 64)},
        {"sha256": Variant("u", 1)},
        {"sha256": Variant("s", ZERO_SHA), "size": Variant("t", 0)},
        {"sha256": Variant("s", ZERO_SHA), "color": Variant("s", "red")},
    ],
    ids=["no-sha256", "short-sha256", "not-hex", "wrong-type", "size-0", "unknown-key"],
)
async def test_bad_options_are_refused(
    daemon: Daemon, client: Client, server: FileServer, options: dict[str, Variant]
) -> None:
    before = len(server.requests)
    with pytest.raises(CallFailed) as e:
        await client.call(
            MANAGER_PATH, MANAGER, "DownloadImage", "sa{sv}", [server.url("x.iso"), options]
        )
    assert e.value.name == ERR + "InvalidArgument", e.value
    assert len(server.requests) == before


async def test_plain_http_to_loopback_when_allowed(
    make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(allow_insecure_loopback=True)
    with FileServer(tls=False) as plain:
        job = await download(client, plain.url("plain.iso", size=MiB), sha256=sha(sha256_of(MiB)))
        assert (await finish(client, job))["State"] == "completed"
        with pytest.raises(CallFailed) as e:
            await download(client, "http://example.org/x.iso", sha256=sha(ZERO_SHA))
        assert e.value.name == ERR + "InvalidArgument"
    assert files(daemon) == ["plain.iso"]


async def test_second_download_to_the_same_name_is_refused(
    daemon: Daemon, client: Client, server: FileServer
) -> None:
    url = server.url("twice.iso", size=32 * MiB, rate=2 * MiB)
    job = await download(client, url, sha256=sha(ZERO_SHA))
    with pytest.raises(CallFailed) as e:
        await download(client, url, sha256=sha(ZERO_SHA))
    assert e.value.name == ERR + "InvalidArgument"
    await client.call(job, JOB, "Cancel")
    assert (await finish(client, job))["State"] == "cancelled"
