"""The NeuronError tree: every failure neurond reports, with its fixed D-Bus name, code and number.

The table is API.md's error table. Numbers are row indexes, never reused; a new error is
appended. This module imports nothing of neurond so every layer can raise these.
"""

from __future__ import annotations

from typing import Any, ClassVar

ERROR_PREFIX = "org.neuronos.Neuron1.Error."


class NeuronError(Exception):
    """Base of every error neurond turns into a typed D-Bus error reply.

    ``message`` is one sentence a person can act on (it becomes the reply body);
    ``details`` are the facts as structured data (they go to the journal entry).
    """

    name: ClassVar[str] = "Internal"
    code: ClassVar[str] = "INTERNAL"
    number: ClassVar[int] = 18
    recoverable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.cause = cause
        if cause is not None:
            self.__cause__ = cause

    @classmethod
    def dbus_name(cls) -> str:
        return ERROR_PREFIX + cls.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.dbus_name(),
            "code": self.code,
            "number": self.number,
            "recoverable": self.recoverable,
            "message": self.message,
            "details": dict(self.details),
        }

    def __str__(self) -> str:
        text = f"[{self.code}] {self.message}"
        if self.details:
            text += " (" + ", ".join(f"{k}={v}" for k, v in self.details.items()) + ")"
        if self.cause is not None:
            text += f" caused by: {self.cause}"
        return text


# Explicit classes (not a loop) so type checkers and readers see every name.
class VMNotFoundError(NeuronError):
    """No VM has that name, UUID or path."""

    name, code, number, recoverable = "VMNotFound", "VM_NOT_FOUND", 0, False


class VMAlreadyExistsError(NeuronError):
    """A VM with that name or UUID already exists."""

    name, code, number, recoverable = "VMAlreadyExists", "VM_ALREADY_EXISTS", 1, False


class VMStartFailedError(NeuronError):
    """The hypervisor refused or failed to start the VM."""

    name, code, number, recoverable = "VMStartFailed", "VM_START_FAILED", 2, True


class VMStopFailedError(NeuronError):
    """The VM could not be shut down or powered off."""

    name, code, number, recoverable = "VMStopFailed", "VM_STOP_FAILED", 3, True


class VMCreationFailedError(NeuronError):
    """A step of creating a VM failed; what was made is rolled back."""

    name, code, number, recoverable = "VMCreationFailed", "VM_CREATION_FAILED", 4, True


class InvalidStateError(NeuronError):
    """The method is not allowed in the VM's current state."""

    name, code, number, recoverable = "InvalidState", "VM_INVALID_STATE", 5, True


class GPUNotFoundError(NeuronError):
    """No GPU at that PCI address, or it cannot be passed through."""

    name, code, number, recoverable = "GPUNotFound", "GPU_NOT_FOUND", 6, False


class IOMMUError(NeuronError):
    """The IOMMU is off or unusable."""

    name, code, number, recoverable = "IOMMUError", "IOMMU_ERROR", 7, False


class MissingDependencyError(NeuronError):
    """A host component (firmware, swtpm, …) is not installed."""

    name, code, number, recoverable = "MissingDependency", "MISSING_DEPENDENCY", 8, True


class DownloadFailedError(NeuronError):
    """A download failed (network, HTTP status, disk)."""

    name, code, number, recoverable = "DownloadFailed", "DOWNLOAD_FAILED", 9, True


class ChecksumMismatchError(NeuronError):
    """A downloaded file's checksum differs from the one asked for."""

    name, code, number, recoverable = "ChecksumMismatch", "CHECKSUM_MISMATCH", 10, True


class LibvirtConnectionFailedError(NeuronError):
    """libvirt cannot be reached."""

    name, code, number, recoverable = (
        "LibvirtConnectionFailed",
        "LIBVIRT_CONNECTION_FAILED",
        11,
        True,
    )


class GuestAgentUnavailableError(NeuronError):
    """No QEMU guest agent answers in the VM."""

    name, code, number, recoverable = "GuestAgentUnavailable", "GUEST_AGENT_UNAVAILABLE", 12, True


class InvalidConfigError(NeuronError):
    """The configuration file or a value in it is invalid."""

    name, code, number, recoverable = "InvalidConfig", "INVALID_CONFIG", 13, True


class InvalidArgumentError(NeuronError):
    """An argument or option of a call is invalid."""

    name, code, number, recoverable = "InvalidArgument", "INVALID_ARGUMENT", 14, True


class PermissionDeniedError(NeuronError):
    """The caller is not authorized for this method."""

    name, code, number, recoverable = "PermissionDenied", "PERMISSION_DENIED", 15, True


class CancelledError(NeuronError):
    """The operation was cancelled."""

    name, code, number, recoverable = "Cancelled", "CANCELLED", 16, True


class TimeoutError_(NeuronError):
    """The operation did not finish in time."""

    name, code, number, recoverable = "Timeout", "TIMEOUT", 17, True


class InternalError(NeuronError):
    """An unexpected failure inside neurond (details are in the journal)."""

    name, code, number, recoverable = "Internal", "INTERNAL", 18, False


class AuthorizationDismissedError(NeuronError):
    """The user dismissed the authorization dialog."""

    name, code, number, recoverable = "AuthorizationDismissed", "AUTHORIZATION_DISMISSED", 19, True


class LimitExceededError(NeuronError):
    """The caller is over a per-sender limit."""

    name, code, number, recoverable = "LimitExceeded", "LIMIT_EXCEEDED", 20, True


class NotSupportedError(NeuronError):
    """The hypervisor or host does not support this."""

    name, code, number, recoverable = "NotSupported", "NOT_SUPPORTED", 21, False


class OperationFailedError(NeuronError):
    """An operation failed for a reason with no more specific error."""

    name, code, number, recoverable = "OperationFailed", "OPERATION_FAILED", 22, True


ALL_ERRORS: tuple[type[NeuronError], ...] = (
    VMNotFoundError,
    VMAlreadyExistsError,
    VMStartFailedError,
    VMStopFailedError,
    VMCreationFailedError,
    InvalidStateError,
    GPUNotFoundError,
    IOMMUError,
    MissingDependencyError,
    DownloadFailedError,
    ChecksumMismatchError,
    LibvirtConnectionFailedError,
    GuestAgentUnavailableError,
    InvalidConfigError,
    InvalidArgumentError,
    PermissionDeniedError,
    CancelledError,
    TimeoutError_,
    InternalError,
    AuthorizationDismissedError,
    LimitExceededError,
    NotSupportedError,
    OperationFailedError,
)


def error_table() -> list[tuple[str, str, bool, int]]:
    """(D-Bus name, code, recoverable, number) for every error, in number order."""
    return [(e.dbus_name(), e.code, e.recoverable, e.number) for e in ALL_ERRORS]


def by_dbus_name(name: str) -> type[NeuronError] | None:
    """The error class for a D-Bus error name, or None for a name we do not define."""
    for e in ALL_ERRORS:
        if e.dbus_name() == name:
            return e
    return None
