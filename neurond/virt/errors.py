"""libvirtError → NeuronError, by API.md's mapping table."""

from __future__ import annotations

import libvirt

from neurond.errors import (
    GuestAgentUnavailableError,
    InvalidStateError,
    LibvirtConnectionFailedError,
    NeuronError,
    NotSupportedError,
    TimeoutError_,
    VMAlreadyExistsError,
    VMNotFoundError,
)

_BY_CODE: dict[int, type[NeuronError]] = {
    libvirt.VIR_ERR_NO_DOMAIN: VMNotFoundError,
    libvirt.VIR_ERR_OPERATION_INVALID: InvalidStateError,
    libvirt.VIR_ERR_NO_SUPPORT: NotSupportedError,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED: NotSupportedError,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE: GuestAgentUnavailableError,
    libvirt.VIR_ERR_AGENT_UNSYNCED: GuestAgentUnavailableError,
    libvirt.VIR_ERR_OPERATION_TIMEOUT: TimeoutError_,
    libvirt.VIR_ERR_DOM_EXIST: VMAlreadyExistsError,
    libvirt.VIR_ERR_NO_CONNECT: LibvirtConnectionFailedError,
    libvirt.VIR_ERR_INVALID_CONN: LibvirtConnectionFailedError,
    libvirt.VIR_ERR_SYSTEM_ERROR: LibvirtConnectionFailedError,
}


def translate(
    err: libvirt.libvirtError, fallback: type[NeuronError], doing: str, vm: str = ""
) -> NeuronError:
    """The typed error for a libvirt failure while ``doing`` something (a verb phrase)."""
    code = err.get_error_code() or 0
    domain = err.get_error_domain() or 0
    text = (err.get_error_message() or str(err)).strip().rstrip(".")
    cls: type[NeuronError] = _BY_CODE.get(code, fallback)
    if "guest agent is not configured" in text.lower():
        cls = GuestAgentUnavailableError
    elif domain == libvirt.VIR_FROM_RPC:
        cls = LibvirtConnectionFailedError
    elif code == libvirt.VIR_ERR_SYSTEM_ERROR and domain != libvirt.VIR_FROM_REMOTE:
        cls = fallback  # a host system error, not a lost connection
    elif code == libvirt.VIR_ERR_INVALID_ARG and "unsupported flags" in text:
        cls = NotSupportedError
    subject = f" VM {vm!r}" if vm else ""
    message = f"Could not {doing}{subject}: libvirt says: {text}."
    return cls(
        message,
        details={"libvirt_code": code, "libvirt_domain": domain, "vm": vm},
        cause=err,
    )
