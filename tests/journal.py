"""A real systemd-journald for tests, isolated from the host in its own mount namespace.

journald runs inside ``unshare -m`` with tmpfs over /run/systemd/journal and /run/log, so
its sockets and its (volatile) journal exist only in that namespace. Commands run through
``wrap()`` enter the namespace and log into it; ``entries()`` reads it back with journalctl.
Measured here: the socket is there 10-20 ms after start (so ``start()`` is cheap per test).
Needs root (mount namespaces) and /lib/systemd/systemd-journald.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

JOURNALD = "/lib/systemd/systemd-journald"
SOCKET = "/run/systemd/journal/socket"
# /var/log/journal gets a tmpfs too: journald writes there once asked to flush,
# and that directory is the host's persistent journal.
_SCRIPT = (
    "mount -t tmpfs tmpfs /run/systemd/journal && mount -t tmpfs tmpfs /run/log && "
    "{ [ ! -d /var/log/journal ] || mount -t tmpfs tmpfs /var/log/journal; } && "
    f"exec {JOURNALD}"
)


def _text(value: Any) -> str:
    """journalctl's JSON gives binary fields as byte arrays and repeated fields as lists."""
    if isinstance(value, list):
        if all(isinstance(b, int) for b in value):
            return bytes(value).decode("utf-8", "replace")
        return "\n".join(_text(v) for v in value)
    return "" if value is None else str(value)


class PrivateJournal:
    """One journald in a private mount namespace; use as a context manager or start()/stop()."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self.startup_s: float | None = None  # time until the socket existed

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("PrivateJournal is not started")
        return self._proc.pid

    def start(self, timeout: float = 5.0) -> None:
        # unshare needs the mount points to exist before it can mount over them.
        os.makedirs("/run/systemd/journal", exist_ok=True)
        os.makedirs("/run/log", exist_ok=True)
        # A file, not a pipe: nobody reads journald's stderr while it runs,
        # and a full pipe would block it.
        self._stderr = tempfile.TemporaryFile()
        began = time.monotonic()
        self._proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", _SCRIPT],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        # unshare and sh exec, so the pid ends up being journald's. Check the socket through
        # /proc/PID/root only once that pid is journald: before that it is the host's view.
        while True:
            if self._proc.poll() is not None:
                self._stderr.seek(0)
                err = self._stderr.read().decode(errors="replace")
                self.stop()
                raise RuntimeError(f"systemd-journald exited at start: {err.strip()}")
            try:
                is_journald = os.readlink(f"/proc/{self.pid}/exe").endswith("systemd-journald")
            except OSError:
                is_journald = False
            if is_journald and os.path.exists(f"/proc/{self.pid}/root{SOCKET}"):
                break
            if time.monotonic() - began > timeout:
                self.stop()
                raise TimeoutError(f"systemd-journald socket not ready after {timeout} s")
            time.sleep(0.002)
        self.startup_s = time.monotonic() - began

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside the journal's mount namespace, so it logs to this journald."""
        return ["nsenter", "-t", str(self.pid), "-m", "--", *cmd]

    def entries(self, **match: str) -> list[dict[str, str]]:
        """Every entry matching all FIELD=value pairs, oldest first."""
        # --directory keeps the host's journals out even if the namespace mounts leaked;
        # --all keeps fields over 4096 bytes (tracebacks), which json output turns into null.
        cmd = ["journalctl", "--directory=/run/log/journal", "-o", "json", "--all", "--no-pager"]
        cmd += [f"{k}={v}" for k, v in match.items()]
        out = subprocess.run(self.wrap(cmd), capture_output=True, text=True, check=True, timeout=10)
        return [
            {k: _text(v) for k, v in json.loads(line).items()}
            for line in out.stdout.splitlines()
            if line.strip()
        ]

    def wait_for(
        self,
        predicate: Callable[[dict[str, str]], bool] = lambda _entry: True,
        timeout: float = 5.0,
        **match: str,
    ) -> dict[str, str]:
        """The first entry matching ``match`` and ``predicate``, polling until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.entries(**match):
                if predicate(entry):
                    return entry
            if time.monotonic() > deadline:
                raise TimeoutError(f"no journal entry matching {match} within {timeout} s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill journald; the namespace and its tmpfs go with the last process in it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> PrivateJournal:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
