"""The neurond process as systemd and an administrator see it: sd_notify, signals, the command
line, the configuration file, fault hooks, the call timeout, a second instance, the unit file.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant

import neurond
from tests.bus.conftest import (
    ERR,
    JOB,
    MANAGER,
    MANAGER_PATH,
    NAME,
    TEST_PATH,
    TEST_UUID,
    VM,
    CallFailed,
    Client,
)
from tests.harness import REPO_ROOT, Daemon, PrivateBus, to_toml

STOP_S = 5.0
# Time a process needs after its stop budget to release the name, disconnect and exit.
EXIT_SLACK_S = 1.5


async def bus_call(client: Client, member: str, signature: str = "", body: Any = None) -> Any:
    reply = await client.bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member=member, signature=signature, body=body or [],
    ))  # fmt: skip
    assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, reply
    return reply.body[0]


def rewrite_config(daemon: Daemon, **sections: Mapping[str, Any]) -> None:
    """Merge ``sections`` into the daemon's config file (for SIGHUP tests)."""
    data = tomllib.loads(daemon.config_path.read_text())
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    daemon.config_path.write_text(to_toml(data))


def wait_for_log(daemon: Daemon, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.stderr_text():
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.stderr_text()
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged within {timeout} s:\n{daemon.stderr_text()}")
        time.sleep(0.02)


async def timed_pause(client: Client) -> tuple[str, float]:
    """Call Pause on the test VM; return ("ok" or the error name, seconds taken)."""
    began = time.monotonic()
    try:
        await client.call(TEST_PATH, VM, "Pause")
        outcome = "ok"
    except CallFailed as e:
        outcome = e.name
    return outcome, time.monotonic() - began


# ---- sd_notify --------------------------------------------------------------------------


async def test_ready_and_status_once_the_name_is_owned(daemon: Daemon, client: Client) -> None:
    assert "READY=1" in daemon.notifications, daemon.notifications
    status = [n for n in daemon.notifications if n.startswith("STATUS=")]
    assert status and status[0] != "STATUS=", daemon.notifications
    # READY=1 means the name is owned, by this very process.
    pid = await bus_call(client, "GetConnectionUnixProcessID", "s", [NAME])
    assert pid == daemon.pid
    # No watchdog pings when systemd did not ask for them.
    await asyncio.sleep(0.3)
    assert "WATCHDOG=1" not in daemon.notifications
    assert await client.get(MANAGER_PATH, MANAGER, "Version") == neurond.__version__


def test_watchdog_pings_at_half_the_interval(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon(env={"WATCHDOG_USEC": "400000"})  # 0.4 s: a ping every 0.2 s
    began = time.monotonic()
    time.sleep(1.1)
    pings = d.notifications.count("WATCHDOG=1")
    elapsed = time.monotonic() - began
    assert pings >= 4, f"{pings} WATCHDOG=1 in {elapsed:.2f} s: {d.notifications}"
    assert pings <= 2 + elapsed / 0.2 * 1.5, f"{pings} pings in {elapsed:.2f} s: too many"


# ---- command line -----------------------------------------------------------------------


def test_version_prints_and_exits_zero() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "neurond", "--version"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"neurond {neurond.__version__}", out.stdout
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert neurond.__version__ == project["version"]


# ---- stopping ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_on_idle_daemon_stops_cleanly(
    sig: signal.Signals, start_daemon: Callable[..., Daemon], client: Client
) -> None:
    d = start_daemon(config={"timeouts": {"stop_s": STOP_S}})
    began = time.monotonic()
    code = await asyncio.to_thread(d.stop, sig, STOP_S)
    took = time.monotonic() - began
    assert code == 0, d.stderr_text()
    assert took < STOP_S, f"an idle neurond took {took:.2f} s to stop"
    assert "STOPPING=1" in d.notifications, d.notifications
    assert d.notifications.index("STOPPING=1") > d.notifications.index("READY=1")
    assert await bus_call(client, "NameHasOwner", "s", [NAME]) is False
    assert "Traceback" not in d.stderr_text(), d.stderr_text()


async def test_sigterm_during_a_slow_call_answers_it_and_exits(
    start_daemon: Callable[..., Daemon], client: Client
) -> None:
    d = start_daemon(
        config={"timeouts": {"stop_s": STOP_S}},
        extra_args=["--test-hooks"],
        env={"NEUROND_FAULTS": "virt.suspend:delay:3"},
    )
    assert d.proc is not None
    pause = asyncio.ensure_future(timed_pause(client))
    await asyncio.sleep(0.5)
    assert not pause.done(), pause.result()  # in flight: the delay holds it for 3 s
    d.proc.send_signal(signal.SIGTERM)
    began = time.monotonic()

    outcome, _ = await asyncio.wait_for(pause, STOP_S + EXIT_SLACK_S)
    # Its own reply or Cancelled; never NoReply/Disconnected (the daemon left without answering).
    assert outcome in ("ok", ERR + "Cancelled"), outcome
    code = await asyncio.to_thread(d.proc.wait, STOP_S + EXIT_SLACK_S)
    took = time.monotonic() - began
    d.stop()  # collects the last notifications (the process is gone: no signal is sent)
    assert code == 0, d.stderr_text()
    assert took < STOP_S + EXIT_SLACK_S, f"exit {took:.2f} s after SIGTERM"
    assert "STOPPING=1" in d.notifications, d.notifications


async def test_sigterm_while_libvirt_hangs_still_exits_within_the_bound(
    start_daemon: Callable[..., Daemon], client: Client
) -> None:
    """A libvirt call that outlasts stop_s (a stuck libvirtd or QEMU monitor) is cancelled for
    the caller, and the process must not wait for it either: systemd would SIGKILL it."""
    stop_s, hang_s = 2.0, 6.0
    d = start_daemon(
        config={"timeouts": {"stop_s": stop_s}},
        extra_args=["--test-hooks"],
        env={"NEUROND_FAULTS": f"virt.suspend:delay:{hang_s}"},
    )
    assert d.proc is not None
    pause = asyncio.ensure_future(timed_pause(client))
    await asyncio.sleep(0.5)
    d.proc.send_signal(signal.SIGTERM)
    began = time.monotonic()
    outcome, _ = await asyncio.wait_for(pause, stop_s + EXIT_SLACK_S)
    assert outcome == ERR + "Cancelled", outcome
    try:
        code = await asyncio.to_thread(d.proc.wait, hang_s)
    except subprocess.TimeoutExpired:
        code = None
    took = time.monotonic() - began
    assert code == 0, d.stderr_text()
    assert took < stop_s + EXIT_SLACK_S, (
        f"neurond exited {took:.2f} s after SIGTERM (stop_s {stop_s:g}): it waited for the "
        f"hung libvirt call although it had logged 'neurond stopped'"
    )


# ---- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"timeouts": {"bogus_s": 1}}, "timeouts.bogus_s"),  # unknown key in a section
        ({"bogus": 1}, "bogus"),  # unknown top-level key
        ({"timeouts": {"call_s": "fast"}}, "timeouts.call_s"),  # wrong type
        ({"timeouts": {"call_s": 60}}, "timeouts.call_s"),  # API.md: at most 20
        ({"logging": {"level": "loud"}}, "logging.level"),
    ],
    ids=["unknown-key", "unknown-top-level-key", "wrong-type", "out-of-range", "bad-choice"],
)
def test_bad_config_exits_78_naming_the_field(
    private_bus: PrivateBus, config: dict[str, Any], field: str
) -> None:
    d = Daemon(private_bus, config=config)
    try:
        with pytest.raises(RuntimeError, match="exited"):
            d.start(timeout=20)
        assert d.proc is not None
        assert d.proc.returncode == 78, (d.proc.returncode, d.stderr_text())
        err = d.stderr_text()
        assert field in err, err
        assert "Traceback" not in err, err
        assert "READY=1" not in d.notifications
    finally:
        d.close()


def test_config_that_is_not_toml_exits_78(private_bus: PrivateBus) -> None:
    d = Daemon(private_bus)
    d.config_path.write_text("[timeouts\ncall_s = 1\n")
    try:
        with pytest.raises(RuntimeError, match="exited"):
            d.start(timeout=20)
        assert d.proc is not None and d.proc.returncode == 78, d.stderr_text()
        assert str(d.config_path) in d.stderr_text(), d.stderr_text()
    finally:
        d.close()


def test_neurond_config_names_the_file_without_the_flag(private_bus: PrivateBus) -> None:
    """API.md: the default file is overridden by NEUROND_CONFIG (here: a bad one, so it shows)."""

    def drop_config_flag(cmd: list[str]) -> list[str]:
        i = cmd.index("--config")
        return cmd[:i] + cmd[i + 2 :]

    d = Daemon(private_bus, wrap=drop_config_flag)
    d.config_path.write_text(d.config_path.read_text() + "\n[jobs]\nlinger_minutes = 1\n")
    d.env["NEUROND_CONFIG"] = str(d.config_path)
    try:
        with pytest.raises(RuntimeError, match="exited"):
            d.start(timeout=20)
        assert d.proc is not None and d.proc.returncode == 78, d.stderr_text()
        assert "jobs.linger_minutes" in d.stderr_text(), d.stderr_text()
    finally:
        d.close()


async def test_flags_override_the_file(start_daemon: Callable[..., Daemon], client: Client) -> None:
    # The harness passes --libvirt-uri test:///default; the file says otherwise.
    start_daemon(config={"libvirt_uri": "test:///nonexistent/node.xml"})
    assert await client.get(MANAGER_PATH, MANAGER, "LibvirtURI") == "test:///default"
    (vms,) = await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    assert [v[0] for v in vms] == ["test"]


async def test_sighup_with_a_bad_file_keeps_the_old_config(
    start_daemon: Callable[..., Daemon], client: Client
) -> None:
    d = start_daemon(
        config={"timeouts": {"call_s": 1}},
        extra_args=["--test-hooks"],
        env={"NEUROND_FAULTS": "virt.suspend:delay:2"},
    )
    assert d.proc is not None
    # A longer call timeout (would make Pause succeed) next to an unknown key: all or nothing.
    rewrite_config(d, timeouts={"call_s": 20, "bogus_s": 1})
    d.proc.send_signal(signal.SIGHUP)
    await asyncio.to_thread(wait_for_log, d, "Reload failed")
    assert "timeouts.bogus_s" in d.stderr_text(), d.stderr_text()
    assert d.proc.poll() is None

    (vms,) = await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    assert [v[0] for v in vms] == ["test"]
    outcome, took = await timed_pause(client)
    assert outcome == ERR + "Timeout", f"{outcome} after {took:.2f} s: the bad file was applied"
    assert took < 1.9, took


async def test_sighup_applies_a_good_config(
    start_daemon: Callable[..., Daemon], client: Client
) -> None:
    d = start_daemon(extra_args=["--test-hooks"], env={"NEUROND_FAULTS": "virt.suspend:delay:3"})
    assert d.proc is not None
    rewrite_config(d, timeouts={"call_s": 0.5})
    d.proc.send_signal(signal.SIGHUP)
    await asyncio.to_thread(wait_for_log, d, "Configuration reloaded")
    outcome, took = await timed_pause(client)
    assert outcome == ERR + "Timeout", f"{outcome} after {took:.2f} s: call_s 0.5 not applied"
    assert 0.4 < took < 1.5, took
    assert d.proc.poll() is None


# ---- fault hooks and the call timeout ---------------------------------------------------


async def test_faults_are_ignored_without_test_hooks(
    start_daemon: Callable[..., Daemon], client: Client
) -> None:
    # Without the flag the variable is not even parsed: a malformed entry cannot stop the start.
    d = start_daemon(env={"NEUROND_FAULTS": "bus.ListVMs:error,bus.GetVM:error,not-a-fault"})
    (vms,) = await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    assert [v[0] for v in vms] == ["test"]
    assert await client.call(MANAGER_PATH, MANAGER, "GetVM", "s", ["test"]) == [TEST_PATH]
    assert "Test hooks" not in d.stderr_text(), d.stderr_text()


async def test_the_same_faults_act_with_test_hooks(
    start_daemon: Callable[..., Daemon], client: Client
) -> None:
    """The counterpart of the test above: the variable is honoured with the flag."""
    d = start_daemon(extra_args=["--test-hooks"], env={"NEUROND_FAULTS": "bus.ListVMs:error"})
    with pytest.raises(CallFailed) as failed:
        await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    assert failed.value.name == ERR + "Internal"
    assert "Test hooks enabled" in d.stderr_text()


async def test_slow_call_fails_with_timeout_after_call_s(
    start_daemon: Callable[..., Daemon], client: Client
) -> None:
    d = start_daemon(
        config={"timeouts": {"call_s": 1}},
        extra_args=["--test-hooks"],
        env={"NEUROND_FAULTS": "virt.suspend:delay:3"},
    )
    outcome, took = await timed_pause(client)
    assert outcome == ERR + "Timeout", outcome
    assert 0.9 < took < 1.9, took
    # The daemon is fine afterwards.
    (vms,) = await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    assert vms
    assert d.proc is not None and d.proc.poll() is None


# ---- a second instance ------------------------------------------------------------------


async def test_second_daemon_exits_nonzero_and_first_keeps_serving(
    private_bus: PrivateBus, daemon: Daemon, client: Client
) -> None:
    owner = await bus_call(client, "GetNameOwner", "s", [NAME])
    second = Daemon(private_bus)
    try:
        with pytest.raises(RuntimeError, match="exited"):
            await asyncio.to_thread(second.start, 20)
        assert second.proc is not None
        assert second.proc.returncode not in (0, None), second.stderr_text()
        assert NAME in second.stderr_text(), second.stderr_text()
    finally:
        second.close()
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert await bus_call(client, "GetNameOwner", "s", [NAME]) == owner
    (vms,) = await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    assert [v[0] for v in vms] == ["test"]


# ---- the systemd unit -------------------------------------------------------------------


def test_unit_file_never_enables_test_hooks() -> None:
    unit = REPO_ROOT / "systemd" / "neurond.service"
    assert unit.is_file(), f"{unit.relative_to(REPO_ROOT)} is missing (the unit ships with neurond)"
    exec_lines = [
        line.strip() for line in unit.read_text().splitlines()
        if line.strip().startswith("Exec")
    ]  # fmt: skip
    assert any(line.startswith("ExecStart=") for line in exec_lines), exec_lines
    offending = [line for line in exec_lines if "--test-hooks" in line]
    assert not offending, offending
    assert "NEUROND_FAULTS" not in unit.read_text()


async def test_leftover_delete_records_are_rolled_forward_and_bad_ones_left(
    private_bus: PrivateBus, client: Client
) -> None:
    """A delete record a killed neurond left is finished at the next start: the domain
    (the test driver's "test") and exactly the file it names go; an unrelated file stays.
    Records that are corrupt, of another version or kind, with the wrong types, naming
    another VM or relative paths (and create records with the wrong types or XML that does
    not parse) are logged and left untouched, and the start goes on."""
    d = Daemon(private_bus)
    named = d.image_dir / "test_VARS.fd"
    named.write_bytes(b"vars")
    (d.image_dir / "unrelated.qcow2").write_bytes(b"keep")
    (d.state_dir / "keep").write_bytes(b"keep")  # not neurond's to delete: not in image_dir
    good = {"uuid": TEST_UUID, "name": "test", "volumes": [], "files": [str(named)],
            "kind": "delete", "version": 1}  # fmt: skip
    (d.state_dir / f"delete-{TEST_UUID}.json").write_text(json.dumps(good))
    # Each bad record is named for its own UUID, so only its own fault can reject it.
    bad: dict[str, Callable[[str], Any]] = {
        "not JSON": lambda u: "{not json",
        "a list": lambda u: [{**good, "uuid": u}],
        "version 2": lambda u: {**good, "uuid": u, "version": 2},
        "kind create": lambda u: {**good, "uuid": u, "kind": "create"},
        "a string for a list": lambda u: {**good, "uuid": u, "files": str(named)},
        "a number for a path": lambda u: {**good, "uuid": u, "volumes": [7]},
        "a number for the name": lambda u: {**good, "uuid": u, "name": 7},
        "an unknown field": lambda u: {**good, "uuid": u, "wipe": True},
        "a missing field": lambda u: {"uuid": u, "volumes": [], "files": []},
        "a relative path": lambda u: {**good, "uuid": u, "files": ["images/../x"]},
        "a file outside": lambda u: {**good, "uuid": u, "files": [str(d.state_dir / "keep")]},
        "another VM": lambda u: good,
    }
    left = {"keep": "keep"}
    for i, make in enumerate(bad.values()):
        uuid = f"{i:08x}-1111-4222-8333-944455556666"
        content = make(uuid)
        path = d.state_dir / f"delete-{uuid}.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        left[path.name] = path.read_text()
    # Create records of the right shape but with a number for a name, XML that does not parse.
    create = {"name": "half", "pool_dir": str(d.image_dir), "volume": "", "capacity_gib": 1,
              "nvram": "", "nvram_template": "", "shm": "", "shm_mib": 0, "xml": "",
              "autostart": False, "done": [], "kind": "create", "version": 1}  # fmt: skip
    for i, bad_create in enumerate([{"volume": 7}, {"xml": "<domain"}]):
        uuid = f"{i:08x}-2222-4222-8333-944455556666"
        path = d.state_dir / f"create-{uuid}.json"
        path.write_text(json.dumps({**create, "uuid": uuid, **bad_create}))
        left[path.name] = path.read_text()
    try:
        d.start()
        names = [row[0] for row in (await client.call(MANAGER_PATH, MANAGER, "ListVMs"))[0]]
        assert "test" not in names
        with pytest.raises(CallFailed):
            await client.get(TEST_PATH, VM, "State")  # not exported
        assert not named.exists()
        assert sorted(p.name for p in d.image_dir.iterdir()) == ["unrelated.qcow2"]
        assert {p.name: p.read_text() for p in d.state_dir.iterdir()} == left
        log = d.stderr_text()
        assert log.count("Cannot use the delete record") == len(bad), log
        assert log.count("Cannot use the create record") == 2, log
        assert "Completed the interrupted delete of test" in log, log
        assert "Traceback" not in log, log
    finally:
        d.close()


async def job_end(client: Client, job: str, timeout: float = 20.0) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while (state := await client.get(job, JOB, "State")) not in (
        "completed",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, f"job {job} still {state}"
        await asyncio.sleep(0.05)
    return state, await client.get(job, JOB, "ErrorName")


async def test_sigterm_mid_delete_before_the_stop_keeps_the_vm_and_drops_the_record(
    start_daemon: Callable[..., Daemon], client: Client
) -> None:
    """Up to the stop a delete can still be called off: SIGTERM cancels its job, the VM stays
    and so does no record that would make the next start delete it anyway."""
    d = start_daemon(
        config={"timeouts": {"stop_s": STOP_S}},
        extra_args=["--test-hooks"],
        env={"NEUROND_FAULTS": "delete.stop:delay:30"},
    )
    force = {"force": Variant("b", True), "delete_storage": Variant("b", True)}
    (job,) = await client.call(TEST_PATH, VM, "Delete", "a{sv}", [force])
    record = d.state_dir / f"delete-{TEST_UUID}.json"
    deadline = time.monotonic() + 10
    while not record.exists():
        assert time.monotonic() < deadline, "no delete record"
        await asyncio.sleep(0.02)
    assert json.loads(record.read_text())["kind"] == "delete"
    code = await asyncio.to_thread(d.stop, signal.SIGTERM, STOP_S + EXIT_SLACK_S)
    assert code == 0, d.stderr_text()
    assert "STOPPING=1" in d.notifications
    completed = [m.body for m in client.signals if m.member == "Completed" and m.path == job]
    assert completed == [[False, ERR + "Cancelled", completed[0][2]]], completed
    assert list(d.state_dir.iterdir()) == []


async def test_delete_with_a_read_only_state_dir_fails_typed_and_changes_nothing(
    tmp_path: Path, start_daemon: Callable[..., Daemon], client: Client
) -> None:
    """The delete record cannot be written: the Delete job fails with OperationFailed before
    anything is stopped or removed (a read-only tmpfs: root ignores permission bits)."""
    state = tmp_path / "ro-state"
    state.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(state)]
    subprocess.run(mount, check=True, capture_output=True)
    try:
        d = start_daemon(config={"storage": {"state_dir": str(state)}})
        force = {"force": Variant("b", True), "delete_storage": Variant("b", True)}
        (job,) = await client.call(TEST_PATH, VM, "Delete", "a{sv}", [force])
        assert await job_end(client, job) == ("failed", ERR + "OperationFailed")
        assert "delete record" in await client.get(job, JOB, "ErrorMessage")
        assert await client.get(TEST_PATH, VM, "State") == "running"  # not even stopped
        assert list(state.iterdir()) == []
        assert d.proc is not None and d.proc.poll() is None
        assert "Traceback" not in d.stderr_text(), d.stderr_text()
    finally:
        subprocess.run(["umount", str(state)], check=False, capture_output=True)


async def test_a_delete_that_cannot_remove_everything_keeps_its_record_for_the_next_start(
    private_bus: PrivateBus, client: Client
) -> None:
    """Past the undefine a delete goes on; what it cannot remove (here: the files, by the
    fault hook) keeps the record, the job fails typed, and the next start finishes it."""
    qemu = {"libvirt": {"domain_type": "qemu"}}
    d = Daemon(private_bus, config=qemu, extra_args=["--test-hooks"],
               env={"NEUROND_FAULTS": "delete.files:libvirt"})  # fmt: skip
    again = Daemon(private_bus, config=qemu)
    again.image_dir.rmdir()
    again.state_dir.rmdir()
    again.image_dir, again.state_dir = d.image_dir, d.state_dir
    again.config_path.write_text(d.config_path.read_text())
    shm = None
    try:
        d.start()
        spec = {"name": Variant("s", "half"), "profile": Variant("s", "windows11"),
                "looking_glass": Variant("b", True)}  # fmt: skip
        vm, job = await client.call(MANAGER_PATH, MANAGER, "CreateVM", "a{sv}", [spec])
        assert await job_end(client, job) == ("completed", "")
        uuid = vm.rsplit("/", 1)[1].replace("_", "-")
        nvram = d.image_dir / f"half-{uuid}_VARS.fd"
        shm = Path(f"/dev/shm/looking-glass-{uuid}")
        assert nvram.exists() and shm.exists()
        storage = {"delete_storage": Variant("b", True)}
        (djob,) = await client.call(vm, VM, "Delete", "a{sv}", [storage])
        assert await job_end(client, djob) == ("failed", ERR + "OperationFailed")
        names = [row[0] for row in (await client.call(MANAGER_PATH, MANAGER, "ListVMs"))[0]]
        assert "half" not in names  # the domain is gone
        assert nvram.exists() and shm.exists()
        rec = json.loads((d.state_dir / f"delete-{uuid}.json").read_text())
        assert rec["files"] == [str(nvram), str(shm)], rec
        assert d.stop() == 0

        again.start()
        assert not nvram.exists() and not shm.exists()
        assert list(d.state_dir.iterdir()) == [] and list(d.image_dir.iterdir()) == []
        assert "Completed the interrupted delete of half" in again.stderr_text()
    finally:
        again.close()
        d.close()
        if shm is not None:
            shm.unlink(missing_ok=True)
