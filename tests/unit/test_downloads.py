"""The DownloadImage checks (URL, file name, sha256) and the small parsers of neurond.downloads."""

from __future__ import annotations

import asyncio
import email.utils

import pytest

from neurond.downloads.fetch import parse_content_range, parse_retry_after
from neurond.downloads.manager import Slots
from neurond.downloads.request import (
    check_filename,
    check_request,
    check_sha256,
    check_url,
    display_url,
    filename_from_url,
    is_loopback_host,
)
from neurond.errors import InvalidArgumentError

SHA = "ab" * 32


@pytest.mark.parametrize(
    "url",
    [
        "https://example.org/win11.iso",
        "https://EXAMPLE.org:8443/a/b/virtio-win-0.1.240.iso?x=1&y=2#frag",
        "HTTPS://[2001:db8::1]/x.iso",
        "https://127.0.0.1/x.iso",
        "https://example.org/a%20b.iso",
    ],
)
def test_good_urls(url: str) -> None:
    assert check_url(url, allow_insecure_loopback=False) == url


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("file:///etc/passwd", "scheme file://"),
        ("ftp://example.org/x.iso", "scheme ftp://"),
        ("gopher://example.org/x", "scheme gopher://"),
        ("example.org/x.iso", "scheme (none)"),
        ("//example.org/x.iso", "scheme (none)"),
        ("https://user:pw@example.org/x.iso", "credentials"),
        ("https://user@example.org/x.iso", "credentials"),
        ("https://:pw@example.org/x.iso", "credentials"),
        ("https:///x.iso", "no host"),
        ("https://example.org:99999/x.iso", "not a valid URL"),
        ("https://example.org:0/x.iso", "port 0"),
        ("http://example.org/x.iso", "plain http"),
        ("http://10.0.0.1/x.iso", "plain http"),
        ("http://127.0.0.1/x.iso", "allow_insecure_loopback"),
        ("https://example.org/a b.iso", "characters"),
        ("https://example.org\\@evil.org/x.iso", "characters"),
        ("https://exämple.org/x.iso", "characters"),
        ("https://example.org/x\x00.iso", "characters"),
        ("https://example.org/x\n.iso", "characters"),
        ("", "1 to 4096"),
        ("https://example.org/" + "a" * 5000, "1 to 4096"),
    ],
)
def test_bad_urls(url: str, words: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        check_url(url, allow_insecure_loopback=False)
    assert words in e.value.message
    assert "pw" not in e.value.message


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/x.iso", "http://127.1.2.3/x", "http://[::1]/x", "http://localhost/x"],
)
def test_http_to_loopback_only_when_allowed(url: str) -> None:
    assert check_url(url, allow_insecure_loopback=True) == url
    with pytest.raises(InvalidArgumentError):
        check_url(url, allow_insecure_loopback=False)


@pytest.mark.parametrize("url", ["http://example.org/x", "http://10.1.1.1/x", "http://[::2]/x"])
def test_http_elsewhere_never(url: str) -> None:
    with pytest.raises(InvalidArgumentError):
        check_url(url, allow_insecure_loopback=True)


def test_loopback_hosts() -> None:
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1")
    assert is_loopback_host("LOCALHOST")
    assert not is_loopback_host("127.0.0.1.example.org")
    assert not is_loopback_host("0.0.0.0")


@pytest.mark.parametrize(
    "name", ["win11.iso", "a..b.iso", "Win 11 (x64).iso", "ü.iso", "x" * 255, "é" * 127]
)
def test_good_filenames(name: str) -> None:
    assert check_filename(name) == name


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("", "empty"),
        ("a/b.iso", "'/'"),
        ("/etc/passwd", "'/'"),
        ("../x.iso", "'/'"),
        ("..", "not a file name"),
        (".", "not a file name"),
        (".hidden.iso", "hidden"),
        ("x\x00y.iso", "NUL"),
        ("x\ny.iso", "control"),
        ("x\x7f", "control"),
        ("x" * 256, "255 bytes"),
        ("x" * 300, "255 bytes"),
        ("é" * 128, "255 bytes"),  # 256 bytes in UTF-8
        ("\udc80.iso", "UTF-8"),
    ],
)
def test_bad_filenames(name: str, words: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        check_filename(name)
    assert words in e.value.message


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://h/a/b/win11.iso", "win11.iso"),
        ("https://h/a/Win%2011.iso?sig=1", "Win 11.iso"),
        ("https://h/x.iso#frag", "x.iso"),
    ],
)
def test_filename_from_url(url: str, name: str) -> None:
    assert filename_from_url(url) == name


@pytest.mark.parametrize(
    "url", ["https://h/", "https://h", "https://h/a/%2e%2e", "https://h/a%2Fb", "https://h/.x"]
)
def test_filename_from_url_refused(url: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        filename_from_url(url)
    assert "filename" in e.value.message


def test_sha256() -> None:
    assert check_sha256("AB" * 32) == SHA
    for bad in ["", "ab", "ab" * 33, "zz" * 32, " " + "ab" * 32]:
        with pytest.raises(InvalidArgumentError):
            check_sha256(bad)


def test_check_request() -> None:
    r = check_request(
        "https://h/d/x.iso", sha256=SHA.upper(), size=5, allow_insecure_loopback=False
    )
    assert (r.url, r.sha256, r.filename, r.size) == ("https://h/d/x.iso", SHA, "x.iso", 5)
    r = check_request("https://h/", sha256=SHA, filename="y.iso", allow_insecure_loopback=False)
    assert r.filename == "y.iso"
    with pytest.raises(InvalidArgumentError):
        check_request("https://h/x", sha256=SHA, size=0, allow_insecure_loopback=False)


def test_display_url_hides_credentials_and_query() -> None:
    assert display_url("https://u:p@h:8443/a/b.iso?sig=secret#f") == "https://h:8443/a/b.iso?…"
    assert display_url("https://[::1]/x") == "https://[::1]/x"


def test_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("soon") is None
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(date, now=1_000_000) == pytest.approx(30)
    assert parse_retry_after(date, now=2_000_000) == 0.0


def test_content_range() -> None:
    assert parse_content_range("bytes 100-199/200") == (100, 199, 200)
    assert parse_content_range("bytes 0-9/*") == (0, 9, None)
    assert parse_content_range("bytes */200") is None
    assert parse_content_range(None) is None


async def test_slots_admit_in_order_and_follow_the_limit() -> None:
    slots = Slots(1)
    order: list[str] = []

    async def job(name: str, hold: asyncio.Event) -> None:
        await slots.acquire()
        order.append(name)
        try:
            await hold.wait()
        finally:
            slots.release()

    holds = {n: asyncio.Event() for n in "abcd"}
    tasks = {n: asyncio.create_task(job(n, holds[n])) for n in "abcd"}
    await asyncio.sleep(0.01)
    assert order == ["a"]
    tasks["b"].cancel()  # cancelled while waiting: takes no slot
    await asyncio.sleep(0.01)
    slots.set_limit(2)
    await asyncio.sleep(0.01)
    assert order == ["a", "c"]
    holds["a"].set()
    await asyncio.sleep(0.01)
    assert order == ["a", "c", "d"]
    holds["c"].set()
    holds["d"].set()
    await asyncio.gather(*(t for n, t in tasks.items() if n != "b"))
    assert slots.used == 0
