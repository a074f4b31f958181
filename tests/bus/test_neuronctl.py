"""neuronctl against a live neurond: tables, --json for scripts, typed exit codes."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

from neurond.errors import InvalidStateError, VMNotFoundError
from tests.harness import Daemon, PrivateBus


def ctl(bus: PrivateBus, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "neurond.cli.main", *args],
        env=bus.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_list_table_and_json(private_bus: PrivateBus, daemon: Daemon) -> None:
    table = ctl(private_bus, "list")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["NAME", "STATE", "UUID"]
    assert "test" in table.stdout and "running" in table.stdout
    data = json.loads(ctl(private_bus, "--json", "list").stdout)
    assert data == [
        {
            "name": "test",
            "uuid": "6695eb01-f6a4-8304-79aa-97f2502e193f",
            "path": "/org/neuronos/Neuron1/vm/6695eb01_f6a4_8304_79aa_97f2502e193f",
            "state": "running",
        }
    ]


def test_lifecycle_and_show(private_bus: PrivateBus, daemon: Daemon) -> None:
    assert ctl(private_bus, "pause", "test").returncode == 0
    shown = json.loads(ctl(private_bus, "--json", "show", "test").stdout)
    assert shown["State"] == "paused" and shown["StateReason"] == "user"
    assert ctl(private_bus, "resume", "test").returncode == 0
    done = ctl(private_bus, "--json", "shutdown", "test")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "completed"
    assert json.loads(ctl(private_bus, "--json", "show", "test").stdout)["State"] == "shutoff"
    jobs = json.loads(ctl(private_bus, "--json", "jobs").stdout)
    assert [j["Operation"] for j in jobs] == ["shutdown-vm"]


def test_typed_errors_exit_distinctly(private_bus: PrivateBus, daemon: Daemon) -> None:
    missing = ctl(private_bus, "show", "nosuchvm")
    assert missing.returncode == 10 + VMNotFoundError.number
    assert missing.stderr.startswith("error: There is no VM named 'nosuchvm'. [VM_NOT_FOUND]")
    assert "hint:" not in missing.stderr  # VMNotFound is not recoverable
    bad_state = ctl(private_bus, "resume", "test")
    assert bad_state.returncode == 10 + InvalidStateError.number
    assert "[VM_INVALID_STATE]" in bad_state.stderr and "hint:" in bad_state.stderr


def test_errors_and_hw(private_bus: PrivateBus, daemon: Daemon) -> None:
    errors = json.loads(ctl(private_bus, "--json", "errors").stdout)
    assert len(errors) == 23 and errors[0]["code"] == "VM_NOT_FOUND"
    hw = json.loads(ctl(private_bus, "--json", "hw").stdout)
    assert set(hw) == {"iommu", "gpus"} and "enabled" in hw["iommu"]


def test_no_daemon_is_a_bus_error(private_bus: PrivateBus) -> None:
    result = ctl(private_bus, "list")
    assert result.returncode == 3  # ServiceUnknown: a bus-level failure
    assert result.stderr.startswith("error:")


def test_create_and_delete(private_bus: PrivateBus, daemon: Daemon) -> None:
    created = ctl(
        private_bus,
        "--json",
        "create",
        "ctlvm",
        "--profile",
        "linux",
        "--vcpus",
        "2",
        "--memory-mib",
        "1024",
        "--disk-gib",
        "2",
    )
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["state"] == "completed"
    shown = json.loads(ctl(private_bus, "--json", "show", "ctlvm").stdout)
    assert shown["VCPUs"] == 2 and shown["MemoryMiB"] == 1024 and shown["State"] == "shutoff"
    again = ctl(private_bus, "create", "ctlvm")
    assert again.returncode == 10 + 1 and "[VM_ALREADY_EXISTS]" in again.stderr
    assert ctl(private_bus, "delete", "ctlvm", "--delete-storage").returncode == 0
    assert ctl(private_bus, "show", "ctlvm").returncode == 10 + VMNotFoundError.number


def test_download_refuses_insecure_url(private_bus: PrivateBus, daemon: Daemon) -> None:
    result = ctl(private_bus, "download", "http://example.invalid/x.iso", "--sha256", "0" * 64)
    assert result.returncode == 10 + 14 and "[INVALID_ARGUMENT]" in result.stderr


def test_watch_prints_live_state_changes(private_bus: PrivateBus, daemon: Daemon) -> None:
    watch = subprocess.Popen(
        [sys.executable, "-m", "neurond.cli.main", "--json", "watch"],
        env=private_bus.env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stdout is not None
        # Keep changing the state until watch, once subscribed, reports a change.
        line = ""
        for _ in range(50):
            ctl(private_bus, "pause", "test")
            ctl(private_bus, "resume", "test")
            ready, _, _ = select.select([watch.stdout], [], [], 0.2)
            if ready:
                line = watch.stdout.readline()
                break
        event = json.loads(line)
        assert event["vm"] == "test" and event["state"] in {"paused", "running"}
    finally:
        watch.kill()
        watch.wait()


def test_media_and_images(private_bus: PrivateBus, start_daemon: Any, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.iso", "b.iso"):
        (images / name).write_bytes(b"\0" * 2048)
    storage = {"image_dir": str(images), "iso_roots": [str(images)]}
    start_daemon(config={"libvirt": {"domain_type": "qemu"}, "storage": storage})
    created = ctl(private_bus, "create", "cd", "--iso", str(images / "a.iso"))
    assert created.returncode == 0, created.stderr
    listed = ctl(private_bus, "images")
    assert listed.stdout.splitlines()[0].split() == ["NAME", "SIZE", "SHA256", "USED", "BY"]
    assert "a.iso  2048  -       cd" in listed.stdout, listed.stdout
    inserted = ctl(private_bus, "media", "cd", str(images / "b.iso"))
    assert inserted.returncode == 0 and "b.iso inserted" in inserted.stdout, inserted.stderr
    data = {i["name"]: i for i in json.loads(ctl(private_bus, "--json", "images").stdout)}
    assert data["b.iso"]["used_by_names"] == ["cd"] and data["a.iso"]["used_by"] == []
    refused = ctl(private_bus, "delete-image", "b.iso")
    assert refused.returncode == 10 + InvalidStateError.number, refused.stderr
    assert "in use by VM 'cd'" in refused.stderr
    assert ctl(private_bus, "eject", "cd").returncode == 0
    deleted = ctl(private_bus, "--json", "delete-image", "b.iso")
    assert json.loads(deleted.stdout) == {"image": "b.iso", "deleted": True}, deleted.stderr
    bad = ctl(private_bus, "media", "cd", "relative.iso")
    assert bad.returncode == 10 + 14 and "[INVALID_ARGUMENT]" in bad.stderr
    assert sorted(p.name for p in images.iterdir()) == ["a.iso"]
