"""What the guest agent and the display answer, as the core passes them between backend and bus."""

from __future__ import annotations

from dataclasses import dataclass

from neurond.errors import GuestAgentUnavailableError

# API.md: each output stream of GuestExec is capped at 16 MiB.
MAX_EXEC_OUTPUT = 16 * 2**20
# GuestExec's stdin travels base64-encoded (4/3) in one agent command with the path and the
# arguments (at most ~1 MiB); libvirt carries at most 4 MiB per agent message.
MAX_EXEC_STDIN = 2 * 2**20


@dataclass(frozen=True, slots=True)
class GuestInfo:
    """GuestInfo's answer; a field the agent cannot tell is ``""``."""

    os: str
    kernel: str
    hostname: str
    agent_version: str


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """One GuestExec: ``path`` is absolute, ``timeout_s`` bounds the whole run in the guest."""

    path: str
    args: tuple[str, ...]
    stdin: bytes
    timeout_s: float


@dataclass(frozen=True, slots=True)
class ExecResult:
    """The exit code and the raw output, each stream at most MAX_EXEC_OUTPUT bytes."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool = False
    stderr_truncated: bool = False


@dataclass(frozen=True, slots=True)
class Display:
    """GetDisplay's answer: ``kind`` is looking-glass, spice, vnc or none."""

    kind: str
    shm_path: str = ""
    uri: str = ""
    fallback_reason: str = ""


def agent_unavailable(name: str, guest_agent: str) -> GuestAgentUnavailableError:
    """The error of a Guest* call on a VM whose agent is not connected (asks nobody)."""
    if guest_agent == "none":
        why = "it has no guest agent channel (org.qemu.guest_agent.0)"
    else:
        why = "its guest agent is not connected (not installed or not running in the guest)"
    return GuestAgentUnavailableError(
        f"VM {name!r} cannot answer: {why}.",
        details={"vm": name, "guest_agent": guest_agent},
    )
