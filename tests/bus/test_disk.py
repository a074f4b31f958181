"""Disk full, unwritable image and state directories, read-only config directory (issue 9, item 8).

On libvirt's test driver, the files neurond writes itself during a CreateVM are the NVRAM copy
(UEFI profiles) in ``storage.image_dir`` and the transaction record in ``storage.state_dir``.
Each directory is made full (a small tmpfs filled up) or read-only (a read-only tmpfs; root
ignores permission bits, so chmod would prove nothing): the create fails with a typed error,
nothing half-written stays, neurond keeps serving. The full-disk download is in
tests/bus/test_downloads.py. A read-only config directory: neurond needs no write access to it,
starts, and a SIGHUP reload works. Needs root (mount); skipped where mounting is not allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant

from tests.bus.conftest import ERR, JOB, MANAGER, MANAGER_PATH, CallFailed, Client
from tests.harness import Daemon

TYPED = {ERR + n for n in ("VMCreationFailed", "InvalidConfig", "OperationFailed")}


def _mount(path: Path, *options: str) -> bool:
    opts = ",".join(("size=1m", *options))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, check=False
    )
    return done.returncode == 0


@pytest.fixture
def mounts() -> Iterator[Callable[..., Path]]:
    """``mount(*options)`` → a new directory with a 1 MiB tmpfs on it (unmounted at the end)."""
    made: list[Path] = []

    def mount(*options: str, fill: bool = False) -> Path:
        path = Path(tempfile.mkdtemp(prefix="neurond-disk-"))
        if not _mount(path, *options):
            path.rmdir()
            pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
        made.append(path)
        if fill:  # everything but a few bytes is taken
            with contextlib.suppress(OSError), open(path / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 65536)
        return path

    yield mount
    for path in made:
        subprocess.run(["umount", "-l", str(path)], check=False)
        with contextlib.suppress(OSError):
            path.rmdir()


def spec(**kw: Any) -> dict[str, Variant]:
    sigs = {bool: "b", int: "t", str: "s"}
    return {k: Variant(sigs[type(v)], v) for k, v in kw.items()}


async def create_outcome(client: Client, name: str) -> str:
    """The typed error of a windows11 (UEFI: an NVRAM copy) create, from the call or its job."""
    try:
        _, job = await client.call(
            MANAGER_PATH, MANAGER, "CreateVM", "a{sv}", [spec(name=name, profile="windows11")]
        )
    except CallFailed as e:
        return e.name
    for _ in range(400):
        state = await client.get(job, JOB, "State")
        if state in ("completed", "failed", "cancelled"):
            return str(await client.get(job, JOB, "ErrorName")) or state
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job} did not end")


async def assert_served(d: Daemon, client: Client, names: list[str]) -> None:
    (vms,) = await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    assert sorted(n for n, *_ in vms) == sorted(names), vms
    assert d.proc is not None and d.proc.poll() is None, d.stderr_text()[-3000:]
    assert "Traceback" not in d.stderr_text(), d.stderr_text()[-3000:]


@pytest.mark.parametrize("where", ["image_dir", "state_dir"])
@pytest.mark.parametrize("how", ["full", "read-only"])
async def test_create_on_a_full_or_read_only_dir(
    start_daemon: Callable[..., Daemon],
    client: Client,
    mounts: Callable[..., Path],
    where: str,
    how: str,
) -> None:
    path = mounts(fill=True) if how == "full" else mounts("ro")
    before = sorted(os.listdir(path))
    d = start_daemon(config={"storage": {where: str(path)}})
    outcome = await create_outcome(client, "disky")
    assert outcome in TYPED, (outcome, d.stderr_text()[-2000:])
    assert sorted(os.listdir(path)) == before  # nothing half-written
    other = d.state_dir if where == "image_dir" else d.image_dir
    assert os.listdir(other) == []
    await assert_served(d, client, ["test"])
    assert not [n for n in os.listdir("/dev/shm") if "disky" in n]


async def test_read_only_config_dir(
    start_daemon: Callable[..., Daemon], client: Client, mounts: Callable[..., Path]
) -> None:
    conf = mounts()

    def wrap(cmd: list[str]) -> list[str]:
        # The harness's config, copied to a directory that then turns read-only.
        i = cmd.index("--config")
        (conf / "neurond.toml").write_text(Path(cmd[i + 1]).read_text())
        subprocess.run(["mount", "-o", "remount,ro", str(conf)], check=True)
        return [*cmd[: i + 1], str(conf / "neurond.toml"), *cmd[i + 2 :]]

    d = start_daemon(wrap=wrap)
    with pytest.raises(OSError):
        (conf / "probe").write_text("x")  # it really is read-only
    await assert_served(d, client, ["test"])
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    d.wait_notification("RELOADING=1")
    deadline = time.monotonic() + 10
    while d.notifications.count("READY=1") < 2:
        assert time.monotonic() < deadline, d.notifications
        await asyncio.sleep(0.05)
    assert "Reload failed" not in d.stderr_text(), d.stderr_text()[-2000:]
    await assert_served(d, client, ["test"])
    assert os.listdir(conf) == ["neurond.toml"]
