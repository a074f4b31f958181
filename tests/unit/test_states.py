"""The method-by-state table is API.md's, pair by pair; libvirt's states and reasons map right."""

from __future__ import annotations

import itertools

import libvirt
import pytest

from neurond.core.states import ALLOWED, REASONS, Method, VMState, allowed, from_libvirt

S = VMState
# API.md, "What each method does in each state", written out independently of the code.
CONTRACT = {
    Method.START: {"shutoff", "crashed"},
    Method.SHUTDOWN: {"running"},
    Method.FORCE_OFF: {"running", "paused", "starting", "stopping", "crashed", "pmsuspended"},
    Method.REBOOT: {"running"},
    Method.RESET: {"running"},
    Method.PAUSE: {"running"},
    Method.RESUME: {"paused"},
    Method.DELETE: {"shutoff", "crashed"},
    Method.DELETE_FORCE: {s.value for s in VMState} - {"creating", "deleting"},
    Method.SET_AUTOSTART: {s.value for s in VMState} - {"creating", "deleting"},
    Method.GUEST: {"running"},
    Method.DISPLAY: {"running", "paused"},
    Method.CREATE: set(),  # not a call: CreateVM's job holds it on the new VM
    Method.RENAME: {"shutoff"},  # issue 12: shut-off VMs only
    Method.SET_RESOURCES: {s.value for s in VMState} - {"creating", "deleting"},
    # issue 12: live on a running or paused VM, persistent on a shut-off one; never mid-transition
    Method.MEDIA: {"shutoff", "running", "paused"},
}


@pytest.mark.parametrize(("method", "state"), list(itertools.product(Method, VMState)))
def test_every_pair_is_allowed_or_rejected_as_the_contract_says(
    method: Method, state: VMState
) -> None:
    assert allowed(method, state) == (state.value in CONTRACT[method])


def test_every_method_has_a_row() -> None:
    assert set(ALLOWED) == set(Method)


@pytest.mark.parametrize(
    ("state", "reason", "expected"),
    [
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED, (S.RUNNING, "booted")),
        (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED, (S.RUNNING, "unpaused")),
        (libvirt.VIR_DOMAIN_BLOCKED, 0, (S.RUNNING, "unknown")),
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER, (S.PAUSED, "user")),
        (
            libvirt.VIR_DOMAIN_SHUTOFF,
            libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED,
            (S.SHUTOFF, "destroyed"),
        ),
        (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN, (S.SHUTOFF, "shutdown")),
        (libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_SHUTDOWN_USER, (S.STOPPING, "user")),
        (libvirt.VIR_DOMAIN_CRASHED, libvirt.VIR_DOMAIN_CRASHED_PANICKED, (S.CRASHED, "panicked")),
        (libvirt.VIR_DOMAIN_PMSUSPENDED, 0, (S.PMSUSPENDED, "unknown")),
        (libvirt.VIR_DOMAIN_NOSTATE, 0, (S.UNKNOWN, "unknown")),
        (99, 0, (S.UNKNOWN, "unknown")),
        (libvirt.VIR_DOMAIN_RUNNING, 999, (S.RUNNING, "unknown")),
    ],
)
def test_from_libvirt(state: int, reason: int, expected: tuple[VMState, str]) -> None:
    assert from_libvirt(state, reason) == expected


@pytest.mark.parametrize(
    ("state", "prefix"),
    [
        (1, "VIR_DOMAIN_RUNNING_"),
        (3, "VIR_DOMAIN_PAUSED_"),
        (5, "VIR_DOMAIN_SHUTOFF_"),
        (6, "VIR_DOMAIN_CRASHED_"),
    ],
)
def test_reason_names_follow_libvirt_constants(state: int, prefix: str) -> None:
    """Each reason's index is the value of libvirt's constant of the same name."""
    for index, name in enumerate(REASONS[state]):
        constant = prefix + name.upper().replace("-", "_")
        # Older libvirt bindings lack the newest reasons (e.g. PAUSED_API_ERROR, libvirt 10).
        if hasattr(libvirt, constant):
            assert getattr(libvirt, constant) == index, constant
