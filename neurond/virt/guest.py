"""The QEMU guest agent through libvirt (``libvirt_qemu.qemuAgentCommand``): ping, info, exec.

Every agent command is one blocking libvirt call, run by the backend in its agent executor
through a ``DomainRunner`` (which also translates libvirt's errors). GuestExec starts the
program with ``guest-exec`` (output captured by the agent) and polls ``guest-exec-status``
with a growing interval until it exits or the deadline passes. Output is raw bytes and is
never logged.

On a timeout the program is killed best-effort with a second guest-exec, ``taskkill /F /T``
on Windows guests (``guest-get-osinfo`` id ``mswindows``) and ``/bin/sh -c 'kill -KILL PID'``
elsewhere, and its status read once more so the agent can forget it; the caller gets
``Timeout`` whether or not the kill worked (the kill is logged).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import libvirt
import libvirt_qemu

from neurond.core.guest import MAX_EXEC_OUTPUT, ExecRequest, ExecResult, GuestInfo
from neurond.errors import (
    NeuronError,
    NotSupportedError,
    OperationFailedError,
    TimeoutError_,
)

_log = logging.getLogger("neurond.virt.guest")

# run(point, doing, fn): fn(domain) in the agent executor; libvirt errors come out typed.
DomainRunner = Callable[[str, str, Callable[[libvirt.virDomain], Any]], Awaitable[Any]]

POLL_FIRST_S = 0.01
POLL_MAX_S = 0.2
KILL_BUDGET_S = 1.5
# base64 characters that decode to at most MAX_EXEC_OUTPUT bytes (rounded up to whole quads)
_MAX_B64 = math.ceil(MAX_EXEC_OUTPUT / 3) * 4
# libvirt's REMOTE_STRING_MAX: the most one qemuAgentCommand command or reply can hold over
# the remote protocol (qemu:///system). Output and input-data travel base64-encoded in one
# JSON message, so about 3 MiB of output fit, far below MAX_EXEC_OUTPUT.
RPC_STRING_MAX = 4 * 2**20


def _command(dom: libvirt.virDomain, execute: str, arguments: Any, timeout_s: float) -> Any:
    """One agent command (blocking); its ``return`` member."""
    msg: dict[str, Any] = {"execute": execute}
    if arguments is not None:
        msg["arguments"] = arguments
    timeout = max(1, math.ceil(timeout_s))
    try:
        reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(msg), timeout, 0)
    except libvirt.libvirtError as e:
        if _too_big(e):
            # Not a lost connection (what other RPC errors are): only this message was too big.
            raise OperationFailedError(
                f"The guest agent command {execute} or its answer is larger than libvirt can "
                f"carry ({RPC_STRING_MAX // 2**20} MiB per agent message, base64-encoded: "
                "about 3 MiB of output and error output together).",
                details={"command": execute, "libvirt_code": e.get_error_code()},
            ) from None
        raise
    try:
        return json.loads(reply)["return"]
    except (ValueError, KeyError, TypeError):
        raise OperationFailedError(
            f"The guest agent answered {execute} with something that is not a QMP reply.",
            details={"command": execute},
        ) from None


def _too_big(e: libvirt.libvirtError) -> bool:
    return (
        e.get_error_domain() == libvirt.VIR_FROM_RPC
        and e.get_error_code() == libvirt.VIR_ERR_RPC
        and "encode message payload" in (e.get_error_message() or "")
    )


def _decode(data: Any, stream: str) -> tuple[bytes, bool]:
    """base64 from the agent → at most MAX_EXEC_OUTPUT raw bytes, and whether it was cut."""
    if data is None:
        return b"", False
    if not isinstance(data, str):
        raise OperationFailedError(f"The guest agent sent {stream} that is not base64 text.")
    cut = len(data) > _MAX_B64
    try:
        raw = base64.b64decode(data[:_MAX_B64], validate=True)
    except (binascii.Error, ValueError):
        raise OperationFailedError(
            f"The guest agent sent {stream} that is not valid base64."
        ) from None
    return raw[:MAX_EXEC_OUTPUT], cut or len(raw) > MAX_EXEC_OUTPUT


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


class GuestAgent:
    """The agent of one domain, for the length of one D-Bus call."""

    def __init__(self, run: DomainRunner, name: str, timeout_s: float) -> None:
        self._run = run
        self._name = name  # the VM, for messages
        self._timeout_s = timeout_s

    async def command(self, point: str, execute: str, arguments: Any = None) -> Any:
        timeout = self._timeout_s
        result = await self._run(
            point,
            f"run the guest agent command {execute} in",
            lambda dom: _command(dom, execute, arguments, timeout),
        )
        return result

    async def _optional(self, point: str, execute: str) -> dict[str, Any]:
        """A command an older agent may lack or have disabled: its reply, or {}."""
        try:
            reply = await self.command(point, execute)
        except (OperationFailedError, NotSupportedError) as e:
            _log.info("The guest agent of %s cannot answer %s: %s", self._name, execute, e.message)
            return {}
        return reply if isinstance(reply, dict) else {}

    async def ping(self) -> None:
        await self.command("virt.guest_ping", "guest-ping")

    async def info(self) -> GuestInfo:
        info = await self.command("virt.guest_info", "guest-info")
        osinfo = await self._optional("virt.guest_info", "guest-get-osinfo")
        host = await self._optional("virt.guest_info", "guest-get-host-name")
        return GuestInfo(
            os=_text(osinfo.get("pretty-name")) or _text(osinfo.get("name")),
            kernel=_text(osinfo.get("kernel-release")),
            hostname=_text(host.get("host-name")),
            agent_version=_text(info.get("version")) if isinstance(info, dict) else "",
        )

    async def exec(self, request: ExecRequest) -> ExecResult:
        arguments: dict[str, Any] = {
            "path": request.path,
            "arg": list(request.args),
            "capture-output": True,
        }
        if request.stdin:
            arguments["input-data"] = base64.b64encode(request.stdin).decode("ascii")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.timeout_s
        started = await self.command("virt.guest_exec", "guest-exec", arguments)
        pid = started.get("pid") if isinstance(started, dict) else None
        if not isinstance(pid, int):
            raise OperationFailedError(
                f"The guest agent of VM {self._name!r} started {request.path} but named no "
                "process.",
                details={"vm": self._name},
            )
        delay = POLL_FIRST_S
        while True:
            status = await self.command("virt.guest_exec", "guest-exec-status", {"pid": pid})
            if not isinstance(status, dict):
                raise OperationFailedError(
                    f"The guest agent of VM {self._name!r} sent a malformed process status.",
                    details={"vm": self._name},
                )
            if status.get("exited"):
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                await self._kill(pid)
                raise TimeoutError_(
                    f"{request.path} did not finish in VM {self._name!r} within "
                    f"{request.timeout_s:g} s; neurond tried to kill it.",
                    details={"vm": self._name, "timeout_s": request.timeout_s, "pid": pid},
                )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, POLL_MAX_S)
        stdout, out_cut = _decode(status.get("out-data"), "output")
        stderr, err_cut = _decode(status.get("err-data"), "error output")
        code = status.get("exitcode")
        if not isinstance(code, int):
            # Killed by a signal: the shell's convention, 128 + the signal number.
            signal = status.get("signal")
            code = 128 + signal if isinstance(signal, int) else -1
        return ExecResult(
            exit_code=code,
            stdout=stdout,
            stderr=stderr,
            stdout_truncated=out_cut or bool(status.get("out-truncated")),
            stderr_truncated=err_cut or bool(status.get("err-truncated")),
        )

    async def _kill(self, pid: int) -> None:
        """Best effort, bounded by KILL_BUDGET_S: the reply must not wait for a stuck agent."""
        try:
            await asyncio.wait_for(self._kill_and_reap(pid), KILL_BUDGET_S)
        except (NeuronError, TimeoutError) as e:
            _log.warning(
                "Could not kill guest process %d in VM %s after its timeout: %s",
                pid,
                self._name,
                e.message if isinstance(e, NeuronError) else "no answer in time",
            )

    async def _kill_and_reap(self, pid: int) -> None:
        osinfo = await self._optional("virt.guest_exec", "guest-get-osinfo")
        if osinfo.get("id") == "mswindows":
            path, args = "C:\\Windows\\System32\\taskkill.exe", ["/F", "/T", "/PID", str(pid)]
        else:
            path, args = "/bin/sh", ["-c", f"kill -KILL {pid}"]
        killer = await self.command(
            "virt.guest_exec", "guest-exec", {"path": path, "arg": args, "capture-output": False}
        )
        _log.info("GuestExec timed out in VM %s: killing guest process %d", self._name, pid)
        pids = [pid]
        if isinstance(killer, dict) and isinstance(killer.get("pid"), int):
            pids.append(killer["pid"])
        # The agent forgets a process once its exit has been read: read both.
        delay = POLL_FIRST_S
        while pids:
            for p in list(pids):
                try:
                    status = await self.command("virt.guest_exec", "guest-exec-status", {"pid": p})
                except OperationFailedError:
                    status = None  # the agent does not know it (any more)
                if not isinstance(status, dict) or status.get("exited"):
                    pids.remove(p)
            if pids:
                await asyncio.sleep(delay)
                delay = min(delay * 2, POLL_MAX_S)
