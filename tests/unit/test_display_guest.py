"""The pure parts of issue 7: display choice from live XML, agent output decoding, features."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from pathlib import Path

import libvirt
import pytest

from neurond.core.features import Feature, FeatureRegistry
from neurond.core.guest import MAX_EXEC_OUTPUT, Display
from neurond.errors import InvalidArgumentError, OperationFailedError
from neurond.validate import guest_command
from neurond.virt import display, guest
from neurond.virt.errors import translate
from neurond.virt.features import graphics_types

UUID = "6e657572-6f6e-4000-8000-00000000a001"


def xml(*devices: str) -> str:
    return f"<domain><name>x</name><devices>{''.join(devices)}</devices></domain>"


LG = (
    f"<shmem name='looking-glass-{UUID}'><model type='ivshmem-plain'/>"
    "<size unit='M'>32</size></shmem>"
)
SPICE = "<graphics type='spice' port='5930' tlsPort='5931' listen='127.0.0.1'/>"
VNC_AUTO = (
    "<graphics type='vnc' port='5907' autoport='yes' listen='0.0.0.0'>"
    "<listen type='address' address='0.0.0.0'/></graphics>"
)


def shm(tmp_path: Path, size: int = 32 * 2**20, mode: int = 0o660) -> Path:
    path = tmp_path / f"looking-glass-{UUID}"
    with open(path, "wb") as f:
        f.truncate(size)
    os.chmod(path, mode)
    return path


def test_order_looking_glass_spice_vnc_none(tmp_path: Path) -> None:
    shm(tmp_path)
    both = xml(LG, SPICE, VNC_AUTO)
    assert display.choose(both, tmp_path) == Display(
        "looking-glass", shm_path=str(tmp_path / f"looking-glass-{UUID}")
    )
    assert display.choose(xml(SPICE, VNC_AUTO), tmp_path) == Display(
        "spice", uri="spice://127.0.0.1:5930"
    )
    assert display.choose(xml(VNC_AUTO), tmp_path) == Display("vnc", uri="vnc://127.0.0.1:5907")
    none = display.choose(xml(), tmp_path)
    assert none.kind == "none" and "no display device" in none.fallback_reason


def test_unusable_options_are_skipped_with_reasons(tmp_path: Path) -> None:
    unix = "<graphics type='spice'><listen type='socket' socket='/run/x.sock'/></graphics>"
    unassigned = "<graphics type='vnc' port='-1' autoport='yes'/>"
    d = display.choose(xml(LG, unix, unassigned), tmp_path)
    assert d.kind == "none"
    assert "does not exist" in d.fallback_reason
    assert "UNIX socket" in d.fallback_reason
    assert "no TCP port assigned" in d.fallback_reason
    d = display.choose(xml(LG, unix, VNC_AUTO), tmp_path)
    assert d.kind == "vnc" and "SPICE is not usable" in d.fallback_reason
    only_sdl = display.choose(xml("<graphics type='sdl'/>"), tmp_path)
    assert only_sdl.kind == "none" and "only sdl" in only_sdl.fallback_reason


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("::", "[::1]"),
        ("fe80::1", "[fe80::1]"),
        ("192.0.2.7", "192.0.2.7"),
        ("host.lan", "host.lan"),
    ],
)
def test_listen_addresses_become_uri_hosts(address: str, host: str) -> None:
    d = display.choose(xml(f"<graphics type='vnc' port='5900' listen='{address}'/>"))
    assert d.uri == f"vnc://{host}:5900"


def test_no_listen_means_libvirts_default_loopback() -> None:
    assert display.choose(xml("<graphics type='vnc' port='5999'/>")).uri == "vnc://127.0.0.1:5999"


def test_shm_checks(tmp_path: Path) -> None:
    size = 32 * 2**20
    path = shm(tmp_path)
    assert display.shm_problem(path, size) == ""
    os.chmod(path, 0o640)
    assert "mode 0640" in display.shm_problem(path, size)
    os.chmod(path, 0o662)
    assert "writable by every user" in display.shm_problem(path, size)
    os.chmod(path, 0o660)
    assert "not 1024" in display.shm_problem(path, 1024)


def test_malformed_xml_is_operation_failed() -> None:
    with pytest.raises(OperationFailedError):
        display.choose("<domain>")


def test_agent_output_is_decoded_and_capped() -> None:
    assert guest._decode(base64.b64encode(b"\0\xff").decode(), "output") == (b"\0\xff", False)
    assert guest._decode(None, "output") == (b"", False)
    big = base64.b64encode(b"x" * (MAX_EXEC_OUTPUT + 10)).decode()
    data, cut = guest._decode(big, "output")
    assert len(data) == MAX_EXEC_OUTPUT and cut
    exact = base64.b64encode(b"y" * MAX_EXEC_OUTPUT).decode()
    assert guest._decode(exact, "output") == (b"y" * MAX_EXEC_OUTPUT, False)
    with pytest.raises(OperationFailedError):
        guest._decode("not base64!", "output")


def test_guest_command_paths() -> None:
    assert guest_command("/bin/sh", ["-c", "x"]) == ("/bin/sh", ("-c", "x"))
    assert guest_command("C:\\Windows\\notepad.exe", [])[0] == "C:\\Windows\\notepad.exe"
    for bad in ("sh", "./sh", "C:notepad.exe", "", "\\single"):
        with pytest.raises(InvalidArgumentError, match="not an absolute path"):
            guest_command(bad, [])


def test_graphics_types_from_domain_capabilities() -> None:
    caps = (
        "<domainCapabilities><devices><graphics supported='yes'><enum name='type'>"
        "<value>sdl</value><value>vnc</value><value>spice</value></enum></graphics>"
        "</devices></domainCapabilities>"
    )
    assert graphics_types(caps) == {"sdl", "vnc", "spice"}
    assert graphics_types("<domainCapabilities/>") == set()


def test_registry_caches_and_logs_a_failing_check(caplog: pytest.LogCaptureFixture) -> None:
    calls = {"n": 0}

    async def yes() -> bool:
        calls["n"] += 1
        return True

    async def broken() -> bool:
        raise OperationFailedError("no answer")

    async def crashing() -> bool:
        raise RuntimeError("bug")

    reg = FeatureRegistry([Feature("vnc", yes), Feature("spice", broken), Feature("x", crashing)])
    assert reg.available() == []
    with caplog.at_level(logging.INFO):
        assert asyncio.run(reg.refresh()) is True
    assert reg.available() == ["vnc"]
    assert calls["n"] == 1 and reg.available() == ["vnc"]  # reads do not re-run checks
    assert asyncio.run(reg.refresh()) is False
    text = caplog.text
    assert "feature 'spice' failed: no answer" in text
    assert "feature 'x' raised" in text and "RuntimeError: bug" in text
    with pytest.raises(ValueError):
        reg.register(Feature("vnc", yes))


def _libvirt_error(code: int, domain: int, message: str) -> libvirt.libvirtError:
    e = libvirt.libvirtError(message)
    e.err = (code, domain, message, 2, "", "", "", 0, 0)
    return e


@pytest.mark.parametrize(
    ("code", "domain", "message", "name"),
    [
        (
            libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
            libvirt.VIR_FROM_QEMU,
            "Guest agent is not responding: QEMU guest agent is not connected",
            "GuestAgentUnavailable",
        ),
        (
            libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
            libvirt.VIR_FROM_QEMU,
            "argument unsupported: QEMU guest agent is not configured",
            "GuestAgentUnavailable",
        ),
        (
            libvirt.VIR_ERR_OPERATION_INVALID,
            libvirt.VIR_FROM_QEMU,
            "Requested operation is not valid: domain is not running",
            "InvalidState",
        ),
        (libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_FROM_QEMU, "timed out", "Timeout"),
    ],
)
def test_agent_errors_as_libvirt_words_them(
    code: int, domain: int, message: str, name: str
) -> None:
    err = translate(_libvirt_error(code, domain, message), OperationFailedError, "ping", "vm1")
    assert err.name == name and message in err.message


def test_an_agent_message_too_big_for_libvirt_is_not_a_lost_connection() -> None:
    big = _libvirt_error(
        libvirt.VIR_ERR_RPC, libvirt.VIR_FROM_RPC, "Unable to encode message payload"
    )
    assert guest._too_big(big)
    assert not guest._too_big(_libvirt_error(libvirt.VIR_ERR_RPC, libvirt.VIR_FROM_RPC, "eof"))
