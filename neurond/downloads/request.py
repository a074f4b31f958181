"""What a DownloadImage call asks for, checked before anything is fetched (pure, no I/O but lstat).

Every refusal is InvalidArgumentError naming the bad part. The rules (API.md, issue 6):

- the URL is ``https://``, or ``http://`` to a loopback host (127.0.0.0/8, ::1, localhost) when
  ``downloads.allow_insecure_loopback`` is on; no credentials (``user:pass@``); only the
  characters RFC 3986 allows, so no parser can read it differently from this one;
- ``sha256`` is 64 hexadecimal digits; ``size``, when given, is at least 1;
- the file name (default: the URL's last path segment, percent-decoded) is one plain name in
  the image directory: no ``/``, no NUL or control characters, not ``.``/``..`` and no hidden
  dot-file (temporary files are dot-files, so they never clash), at most 255 bytes.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from neurond.errors import InvalidArgumentError

MAX_URL = 4096
NAME_MAX = 255  # bytes, as the kernel counts a path component
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
# RFC 3986: unreserved, reserved and '%'. Anything else (spaces, '\', non-ASCII) is refused.
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


@dataclass(frozen=True)
class DownloadRequest:
    """A checked DownloadImage call: where from, the expected content, where to."""

    url: str
    sha256: str
    filename: str
    size: int | None = None

    @property
    def shown_url(self) -> str:
        return display_url(self.url)


def display_url(url: str) -> str:
    """The URL for messages and the journal: no credentials, no query (signed URLs carry tokens)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(invalid URL)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    shown = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return shown + ("?…" if parts.query else "")


def is_loopback_host(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bad_url(reason: str, url: str) -> InvalidArgumentError:
    shown = display_url(url) if "@" not in url else "(a URL with credentials)"
    return InvalidArgumentError(
        f"Cannot download {shown}: {reason}.", details={"argument": "url", "url": shown}
    )


def check_url(url: str, *, allow_insecure_loopback: bool) -> str:
    """The URL if neurond may fetch it, else InvalidArgumentError (also used for redirects)."""
    if not url or len(url) > MAX_URL:
        raise InvalidArgumentError(
            f"The URL must be 1 to {MAX_URL} characters long.", details={"argument": "url"}
        )
    if not _URL_CHARS.fullmatch(url):
        raise InvalidArgumentError(
            "The URL contains characters a URL cannot hold (spaces, control characters, '\\' or "
            "non-ASCII); percent-encode them.",
            details={"argument": "url"},
        )
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _bad_url(f"it is not a valid URL ({e})", url) from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise _bad_url(
            f"the scheme {scheme + '://' if scheme else '(none)'} is not allowed; use https://",
            url,
        )
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise _bad_url("URLs with credentials (user:password@) are not allowed", url)
    host = parts.hostname
    if not host:
        raise _bad_url("it names no host", url)
    if port == 0:
        raise _bad_url("port 0 is not a valid port", url)
    if scheme == "http":
        if not is_loopback_host(host):
            raise _bad_url("plain http:// is not allowed; use https://", url)
        if not allow_insecure_loopback:
            raise _bad_url(
                "plain http:// is allowed only to loopback and only with "
                "downloads.allow_insecure_loopback = true",
                url,
            )
    return url


def check_sha256(value: str) -> str:
    if not SHA256_RE.fullmatch(value):
        raise InvalidArgumentError(
            "Option 'sha256' of DownloadImage must be 64 hexadecimal digits (the SHA-256 of the "
            "file).",
            details={"option": "sha256"},
        )
    return value.lower()


def _show(name: str) -> str:
    text = name[:64].encode("unicode_escape").decode("ascii")
    return text + ("…" if len(name) > 64 else "")


def check_filename(name: str, *, from_url: bool = False) -> str:
    """A plain file name inside the image directory, else InvalidArgumentError."""
    source = "The file name taken from the URL" if from_url else "Option 'filename'"
    hint = "; give a 'filename' option" if from_url else ""

    def bad(reason: str) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"{source} {_show(name)!r} {reason}{hint}.",
            details={"option": "filename"},
        )

    if not name:
        raise bad("is empty")
    if "/" in name:
        raise bad("contains '/'; it must be a plain name in the image directory")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise bad("contains NUL or control characters")
    if name in (".", ".."):
        raise bad("is not a file name")
    if name.startswith("."):
        raise bad("starts with '.'; hidden files are not allowed")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("is not valid UTF-8") from None
    if len(encoded) > NAME_MAX:
        raise bad(f"is longer than {NAME_MAX} bytes")
    return name


def filename_from_url(url: str) -> str:
    """The last path segment of the URL, percent-decoded, checked as a file name."""
    path = urllib.parse.urlsplit(url).path
    segment = path.rsplit("/", 1)[-1]
    try:
        decoded = urllib.parse.unquote(segment, errors="strict")
    except UnicodeDecodeError:
        decoded = ""
    return check_filename(decoded, from_url=True)


def check_request(
    url: str,
    *,
    sha256: str,
    filename: str = "",
    size: int | None = None,
    allow_insecure_loopback: bool,
) -> DownloadRequest:
    """Check every part of a DownloadImage call; the first bad one raises InvalidArgumentError."""
    url = check_url(url, allow_insecure_loopback=allow_insecure_loopback)
    digest = check_sha256(sha256)
    name = check_filename(filename) if filename else filename_from_url(url)
    if size is not None and size < 1:
        raise InvalidArgumentError(
            "Option 'size' of DownloadImage must be at least 1.", details={"option": "size"}
        )
    return DownloadRequest(url=url, sha256=digest, filename=name, size=size)
