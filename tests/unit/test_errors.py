"""The error table: API.md's names, codes, numbers and flags, one class each."""

from __future__ import annotations

import builtins

from neurond import errors

# API.md's error table, copied from the contract: (name, code, recoverable), row = number.
CONTRACT = [
    ("VMNotFound", "VM_NOT_FOUND", False), ("VMAlreadyExists", "VM_ALREADY_EXISTS", False),
    ("VMStartFailed", "VM_START_FAILED", True), ("VMStopFailed", "VM_STOP_FAILED", True),
    ("VMCreationFailed", "VM_CREATION_FAILED", True), ("InvalidState", "VM_INVALID_STATE", True),
    ("GPUNotFound", "GPU_NOT_FOUND", False), ("IOMMUError", "IOMMU_ERROR", False),
    ("MissingDependency", "MISSING_DEPENDENCY", True), ("DownloadFailed", "DOWNLOAD_FAILED", True),
    ("ChecksumMismatch", "CHECKSUM_MISMATCH", True),
    ("LibvirtConnectionFailed", "LIBVIRT_CONNECTION_FAILED", True),
    ("GuestAgentUnavailable", "GUEST_AGENT_UNAVAILABLE", True),
    ("InvalidConfig", "INVALID_CONFIG", True), ("InvalidArgument", "INVALID_ARGUMENT", True),
    ("PermissionDenied", "PERMISSION_DENIED", True), ("Cancelled", "CANCELLED", True),
    ("Timeout", "TIMEOUT", True), ("Internal", "INTERNAL", False),
    ("AuthorizationDismissed", "AUTHORIZATION_DISMISSED", True),
    ("LimitExceeded", "LIMIT_EXCEEDED", True), ("NotSupported", "NOT_SUPPORTED", False),
    ("OperationFailed", "OPERATION_FAILED", True),
]  # fmt: skip


def test_table_matches_contract() -> None:
    expected = [
        (f"org.neuronos.Neuron1.Error.{n}", c, r, i) for i, (n, c, r) in enumerate(CONTRACT)
    ]
    assert errors.error_table() == expected


def test_names_and_codes_unique() -> None:
    names = [e.dbus_name() for e in errors.ALL_ERRORS]
    assert len(set(names)) == len(names)
    assert len({e.code for e in errors.ALL_ERRORS}) == len(names)
    assert [e.number for e in errors.ALL_ERRORS] == list(range(len(names)))


def test_every_subclass_is_in_the_table() -> None:
    subclasses = set(errors.NeuronError.__subclasses__())
    assert subclasses == set(errors.ALL_ERRORS)


def test_no_builtin_shadowed() -> None:
    public = {n for n in vars(errors) if not n.startswith("_")}
    assert not public & set(dir(builtins))


def test_str_and_dict() -> None:
    cause = OSError("disk on fire")
    e = errors.VMNotFoundError("There is no VM named 'x'.", details={"vm": "x"}, cause=cause)
    assert str(e) == "[VM_NOT_FOUND] There is no VM named 'x'. (vm=x) caused by: disk on fire"
    assert e.to_dict() == {
        "name": "org.neuronos.Neuron1.Error.VMNotFound",
        "code": "VM_NOT_FOUND",
        "number": 0,
        "recoverable": False,
        "message": "There is no VM named 'x'.",
        "details": {"vm": "x"},
    }
    assert e.__cause__ is cause


def test_lookup_by_name() -> None:
    assert errors.by_dbus_name("org.neuronos.Neuron1.Error.Timeout") is errors.TimeoutError_
    assert errors.by_dbus_name("org.example.Nope") is None
