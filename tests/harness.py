"""Real components for the bus tests: a private system bus, neurond as a subprocess, fixtures.

Plain helpers, no pytest fixtures: conftest files and scripts build on them. Everything here
starts real programs (dbus-daemon, neurond, busctl, gdbus, setpriv) as TESTING.md describes;
every process and temporary directory has one owner that stops or removes it.

    python -m tests.harness bus   # prints DBUS_SYSTEM_BUS_ADDRESS=..., serves until SIGTERM/SIGINT
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

REPO_ROOT = Path(__file__).resolve().parent.parent
POLICY_FILE = REPO_ROOT / "dbus" / "org.neuronos.Neuron1.conf"
BUS_NAME = "org.neuronos.Neuron1"
NOBODY_UID = 65534

# The stock default policy of /usr/share/dbus-1/system.conf, minus what a test bus has no use
# for (<user>, <fork>, <pidfile>, <syslog>, the setuid launch helper): without <syslog/>,
# dbus-daemon reports policy denials on its stderr, which PrivateBus keeps in its directory.
_BUS_CONFIG = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
{extra}
</busconfig>
"""

SYSTEM_POLICY_DIR = "/usr/share/dbus-1/system.d"


class PrivateBus:
    """A private system-type dbus-daemon with the stock system policy plus the project's policy.

    The socket lives in its own temporary directory (dbus-daemon takes over and later deletes
    an existing socket path, so buses must never share one). `include_system_policies` also
    includes /usr/share/dbus-1/system.d (polkitd's own policy, for tests that run polkit);
    `extra_config` is raw XML appended inside <busconfig> (e.g. a <servicedir>).
    """

    def __init__(
        self,
        *,
        install_policy: bool = True,
        include_system_policies: bool = False,
        extra_config: str = "",
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="neurond-bus-"))
        # mkdtemp makes the directory 0700: other users could not reach the socket inside.
        self.dir.chmod(0o755)
        self.socket_path = self.dir / "system_bus_socket"
        self.policy_dir = self.dir / "system.d"
        self.policy_dir.mkdir(mode=0o755)
        if install_policy:
            shutil.copy(POLICY_FILE, self.policy_dir / POLICY_FILE.name)
        includes = [f"  <includedir>{self.policy_dir}</includedir>"]
        if include_system_policies:
            includes.append(f"  <includedir>{SYSTEM_POLICY_DIR}</includedir>")
        self.config_path = self.dir / "bus.conf"
        self.config_path.write_text(
            _BUS_CONFIG.format(socket=self.socket_path, extra="\n".join([*includes, extra_config]))
        )
        self.log_path = self.dir / "dbus-daemon.log"
        self.address = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Self:
        """Start dbus-daemon and wait until it prints its address (about 15 ms)."""
        read_end, write_end = os.pipe()
        try:
            with open(self.log_path, "wb") as log:
                self._proc = subprocess.Popen(
                    [
                        "dbus-daemon",
                        f"--config-file={self.config_path}",
                        "--nofork",
                        "--nopidfile",
                        f"--print-address={write_end}",
                    ],
                    pass_fds=(write_end,),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            os.close(write_end)
            write_end = -1
            self.address = _read_line(read_end, timeout, self._proc)
        except BaseException:
            self.stop()
            raise
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        if not self.address:
            log_text = self.log_text()
            self.stop()
            raise RuntimeError(f"dbus-daemon printed no address within {timeout} s: {log_text}")
        return self

    def env(self) -> dict[str, str]:
        """A copy of os.environ in which the system bus is this one."""
        env = dict(os.environ)
        env["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        return env

    def log_text(self) -> str:
        """What dbus-daemon wrote to stdout/stderr (policy denials land here)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop dbus-daemon and remove its directory; safe to call twice."""
        if self._proc is not None:
            _terminate(self._proc, timeout=5.0)
            self._proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Daemon:
    """neurond as a subprocess on a PrivateBus, with its own config and NOTIFY_SOCKET.

    `config` overrides are merged per section into the defaults (storage under the daemon's
    temporary directory, polkit off); a non-dict value is a top-level key. `wrap` rewrites the
    command line (e.g. to run it inside a private journald namespace); `env` adds variables
    (e.g. NEUROND_FAULTS). `notifications` holds every sd_notify line received so far
    ("READY=1", "STATUS=...", "WATCHDOG=1", "STOPPING=1"), in order.
    """

    def __init__(
        self,
        bus: PrivateBus,
        *,
        libvirt_uri: str = "test:///default",
        config: Mapping[str, Any] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        self.bus = bus
        self.dir = Path(tempfile.mkdtemp(prefix="neurond-daemon-"))
        self.image_dir = self.dir / "images"
        self.state_dir = self.dir / "state"
        self.image_dir.mkdir()
        self.state_dir.mkdir()
        sections: dict[str, Any] = {
            "storage": {"image_dir": str(self.image_dir), "state_dir": str(self.state_dir)},
            "authorization": {"polkit": False},
        }
        for key, value in (config or {}).items():
            if isinstance(value, Mapping) and isinstance(sections.get(key), dict):
                sections[key] = {**sections[key], **value}
            else:
                sections[key] = value
        self.config_path = self.dir / "neurond.toml"
        self.config_path.write_text(to_toml(sections))
        self.notify_path = self.dir / "notify.sock"
        self.stdout_path = self.dir / "stdout.log"
        self.stderr_path = self.dir / "stderr.log"
        cmd = [
            sys.executable, "-m", "neurond", "--system",
            "--libvirt-uri", libvirt_uri,
            "--config", str(self.config_path),
            "--log-target", "console",
            *extra_args,
        ]  # fmt: skip
        self.cmd = wrap(cmd) if wrap else cmd
        self.env = bus.env()
        for inherited in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "NEUROND_CONFIG"):
            self.env.pop(inherited, None)
        self.env["NOTIFY_SOCKET"] = str(self.notify_path)
        self.env["PYTHONUNBUFFERED"] = "1"  # log lines reach stderr.log as they happen
        self.env.update(env or {})
        self.notifications: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._notify_sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._closing = threading.Event()
        self._changed = threading.Condition()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> Self:
        """Start neurond and wait for READY=1; on failure kill it and raise with its stderr."""
        self._notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify_sock.bind(str(self.notify_path))
        # The reader thread drains the socket all the time: sd_notify blocks the sender when
        # the datagram queue is full, and a watchdog pinging for minutes would fill it.
        self._reader = threading.Thread(target=self._read_notifications, daemon=True)
        self._reader.start()
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # a wrapper's helpers die with it (killpg)
            )
        try:
            self.wait_notification("READY=1", timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def wait_notification(self, line: str, timeout: float = 10.0) -> None:
        """Wait until `line` (e.g. "STOPPING=1") has been received; raise if neurond exits first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while line not in self.notifications:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(
                        f"neurond exited with {self.proc.returncode} before {line!r}:\n"
                        + self.stderr_text()
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no {line!r} from neurond within {timeout} s:\n" + self.stderr_text()
                    )
                # Short waits: the process exiting does not notify the condition.
                self._changed.wait(min(left, 0.05))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig` and return the exit code; SIGKILL (then raise) if it outlives `timeout`."""
        if self.proc is None:
            raise RuntimeError("neurond was never started")
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise TimeoutError(
                    f"neurond did not exit within {timeout} s of signal {sig}:\n"
                    + self.stderr_text()
                ) from None
        self._reap_group()
        self._stop_reader()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL neurond and everything in its session; never raises."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self._reap_group()
        self._stop_reader()

    def close(self) -> None:
        """Kill neurond if still running and remove the temporary directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- inspection ------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None, "neurond was never started"
        return self.proc.pid

    def stderr_text(self) -> str:
        """Everything neurond wrote to stderr so far (its console log)."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stdout_text(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- internals -------------------------------------------------------------------------

    def _read_notifications(self) -> None:
        sock = self._notify_sock
        assert sock is not None
        sock.settimeout(0.1)
        while not self._closing.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self._record(data)

    def _record(self, data: bytes) -> None:
        lines = [line for line in data.decode(errors="replace").split("\n") if line]
        with self._changed:
            self.notifications.extend(lines)
            self._changed.notify_all()

    def _stop_reader(self) -> None:
        self._closing.set()
        if self._reader is not None:
            self._reader.join()
            self._reader = None
        if self._notify_sock is not None:
            # Datagrams sent just before exit (STOPPING=1) may still be queued.
            self._notify_sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    self._record(self._notify_sock.recv(65536))
            self._notify_sock.close()
            self._notify_sock = None

    def _reap_group(self) -> None:
        # Helpers a `wrap` started (e.g. journald) share neurond's session: end them too.
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


# -- libvirt test-driver fixtures ----------------------------------------------------------

_TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
_SHUTOFF = "5"  # VIR_DOMAIN_SHUTOFF: the test driver starts every node domain unless told


class NodeDomain(NamedTuple):
    """One domain of a test-driver node file."""

    name: str
    uuid: str
    running: bool


def make_test_node_xml(
    path: str | os.PathLike[str], n_domains: int, running_every: int = 2
) -> list[NodeDomain]:
    """Write a libvirt test-driver node file with domains vm0000, vm0001, ….

    Every `running_every`-th domain (vm0000 first) is running, the rest shut off; 0 means none
    runs. UUIDs are deterministic: 6e657572-6f6e-4000-8000-<index as 12 hex digits>.
    Open it with node_uri(path). Returns the domains in order.
    """
    ET.register_namespace("test", _TEST_NS)
    node = ET.Element("node")
    domains = []
    for i in range(n_domains):
        dom = NodeDomain(
            name=f"vm{i:04d}",
            uuid=f"6e657572-6f6e-4000-8000-{i:012x}",
            running=running_every > 0 and i % running_every == 0,
        )
        domains.append(dom)
        el = ET.SubElement(node, "domain", type="test")
        ET.SubElement(el, "name").text = dom.name
        ET.SubElement(el, "uuid").text = dom.uuid
        ET.SubElement(el, "memory", unit="MiB").text = "64"
        ET.SubElement(el, "vcpu").text = "1"
        ET.SubElement(ET.SubElement(el, "os"), "type", arch="x86_64").text = "hvm"
        if not dom.running:
            ET.SubElement(el, f"{{{_TEST_NS}}}runstate").text = _SHUTOFF
    ET.indent(node)
    ET.ElementTree(node).write(os.fspath(path), encoding="unicode", xml_declaration=False)
    return domains


def node_uri(path: str | os.PathLike[str]) -> str:
    """The test-driver URI of a node file: test:///ABS/PATH."""
    return "test://" + os.path.abspath(path)


# -- command helpers -----------------------------------------------------------------------


def run_as_nobody(cmd: Sequence[str]) -> list[str]:
    """`cmd` run as uid/gid 65534 with no supplementary groups.

    Note: /root is 0700 here, so the project's venv python (pyenv under /root) cannot run as
    nobody; non-root clients are busctl, gdbus or /usr/bin/python3.
    """
    return [
        "setpriv",
        f"--reuid={NOBODY_UID}",
        f"--regid={NOBODY_UID}",
        "--clear-groups",
        *cmd,
    ]


def busctl(
    bus: PrivateBus, *args: str, as_nobody: bool = False, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """`busctl --system ARGS` against `bus` (check the returncode yourself)."""
    cmd = ["busctl", "--system", "--no-pager", *args]
    return _run(run_as_nobody(cmd) if as_nobody else cmd, bus, timeout)


def gdbus(
    bus: PrivateBus, *args: str, as_nobody: bool = False, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """`gdbus ARGS[0] --system ARGS[1:]` against `bus`, e.g. gdbus(bus, "call", "--dest", …)."""
    cmd = ["gdbus", args[0], "--system", *args[1:]]
    return _run(run_as_nobody(cmd) if as_nobody else cmd, bus, timeout)


def to_toml(data: Mapping[str, Any]) -> str:
    """Serialize a two-level dict (top-level keys, then [sections]) of scalars and lists."""
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    out = [*top, ""] if top else []
    for name, table in data.items():
        if isinstance(table, Mapping):
            out.append(f"[{name}]")
            out.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
            out.append("")
    return "\n".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | os.PathLike):
        # A JSON string is a valid TOML basic string when non-ASCII stays literal.
        return json.dumps(os.fspath(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _run(cmd: list[str], bus: PrivateBus, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        env=bus.env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _read_line(fd: int, timeout: float, proc: subprocess.Popen[bytes]) -> str:
    """Read one line from `fd`; "" on EOF, timeout or `proc` exiting first."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return ""
        ready, _, _ = select.select([fd], [], [], min(left, 0.05))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                return ""
            buf += chunk
        elif proc.poll() is not None:
            return ""
    return buf.split(b"\n", 1)[0].decode()


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve_bus() -> None:
    """`python -m tests.harness bus`: a PrivateBus for scripts, until SIGTERM or SIGINT."""

    # Handlers rather than a blocked mask + sigwait: dbus-daemon would inherit the mask
    # and ignore the SIGTERM that stops it.
    def leave(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    with PrivateBus() as bus:
        print(f"DBUS_SYSTEM_BUS_ADDRESS={bus.address}", flush=True)
        while True:
            signal.pause()


if __name__ == "__main__":
    if sys.argv[1:] != ["bus"]:
        sys.exit("usage: python -m tests.harness bus")
    _serve_bus()
