"""The Manager object, the object tree and the bus-level errors, through D-Bus only.

neurond runs as a subprocess on libvirt's test driver (`test:///default`: one running domain
"test"), or on a node file written by make_test_node_xml for the many-domain cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant

from tests.bus.conftest import (
    DBUS_ERR,
    ERR,
    MANAGER,
    MANAGER_PATH,
    NAME,
    OBJECT_MANAGER,
    PROPERTIES,
    ROOT,
    TEST_PATH,
    TEST_UUID,
    VM,
    CallFailed,
    Client,
)
from tests.harness import make_test_node_xml, node_uri

# API.md "Errors": the binding table, row by row (the row index is the error's number).
CONTRACT_ERRORS: list[tuple[str, str, bool]] = [
    ("VMNotFound", "VM_NOT_FOUND", False),
    ("VMAlreadyExists", "VM_ALREADY_EXISTS", False),
    ("VMStartFailed", "VM_START_FAILED", True),
    ("VMStopFailed", "VM_STOP_FAILED", True),
    ("VMCreationFailed", "VM_CREATION_FAILED", True),
    ("InvalidState", "VM_INVALID_STATE", True),
    ("GPUNotFound", "GPU_NOT_FOUND", False),
    ("IOMMUError", "IOMMU_ERROR", False),
    ("MissingDependency", "MISSING_DEPENDENCY", True),
    ("DownloadFailed", "DOWNLOAD_FAILED", True),
    ("ChecksumMismatch", "CHECKSUM_MISMATCH", True),
    ("LibvirtConnectionFailed", "LIBVIRT_CONNECTION_FAILED", True),
    ("GuestAgentUnavailable", "GUEST_AGENT_UNAVAILABLE", True),
    ("InvalidConfig", "INVALID_CONFIG", True),
    ("InvalidArgument", "INVALID_ARGUMENT", True),
    ("PermissionDenied", "PERMISSION_DENIED", True),
    ("Cancelled", "CANCELLED", True),
    ("Timeout", "TIMEOUT", True),
    ("Internal", "INTERNAL", False),
    ("AuthorizationDismissed", "AUTHORIZATION_DISMISSED", True),
    ("LimitExceeded", "LIMIT_EXCEEDED", True),
    ("NotSupported", "NOT_SUPPORTED", False),
    ("OperationFailed", "OPERATION_FAILED", True),
]

# API.md "org.neuronos.Neuron1.VM": every property and its signature.
VM_PROPERTY_TYPES = {
    "Name": "s",
    "UUID": "s",
    "State": "s",
    "StateReason": "s",
    "Persistent": "b",
    "Autostart": "b",
    "VCPUs": "u",
    "MemoryMiB": "t",
    "GPUAddress": "s",
    "LookingGlass": "b",
    "GuestAgent": "s",
    "Owner": "u",
    "Media": "s",
}

MANAGER_PROPERTY_TYPES = {
    "APIVersion": "u",
    "Version": "s",
    "LibvirtURI": "s",
    "Connected": "b",
    "Features": "as",
}

HOSTILE_NAMES = [
    "",
    "x" * 1_000_000,
    "../..",
    "../../etc/passwd",
    "\x01\x02\x1b[31m junk; $(rm -rf /) `id` \u202e\ufeff",
    "a" * 65,
    "/org/neuronos/Neuron1/vm/x",
    "-leading-dash",
]


async def raw_call(
    client: Client,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
) -> Message:
    """The reply message itself (to check its signature), error or not."""
    reply = await client.bus.call(
        Message(
            destination=NAME,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
        )
    )
    assert reply is not None
    return reply


async def expect_error(
    client: Client,
    name: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
) -> CallFailed:
    """Call, require the error ``name`` with a single-string body, return it."""
    with pytest.raises(CallFailed) as info:
        await client.call(path, interface, member, signature, body)
    err = info.value
    assert err.name == name, f"expected {name}, got {err}"
    assert err.signature == "s" and len(err.body) == 1, (err.signature, err.body)
    assert err.text, "an error reply needs a message a person can act on"
    return err


async def get_vm(client: Client, key: str) -> str:
    (path,) = await client.call(MANAGER_PATH, MANAGER, "GetVM", "s", [key])
    return str(path)


def rows(structs: list[Any]) -> list[list[Any]]:
    """Struct arrays as lists of lists (dbus-fast unmarshals a struct as a tuple or list)."""
    return [list(s) for s in structs]


def unwrap(props: dict[str, Variant]) -> dict[str, Any]:
    return {k: v.value for k, v in props.items()}


def signatures(props: dict[str, Variant]) -> dict[str, str]:
    return {k: v.signature for k, v in props.items()}


def write_unsorted_node(path: Path) -> list[str]:
    """A node file whose domains are defined in non-alphabetical order; returns their names."""
    names = ["zulu", "alpha", "mike", "bravo", "yankee"]
    make_test_node_xml(path, len(names))
    text = path.read_text()
    for i, name in enumerate(names):
        text = text.replace(f"<name>vm{i:04d}</name>", f"<name>{name}</name>")
    path.write_text(text)
    return names


# ---- ListVMs / GetVM --------------------------------------------------------------------


async def test_list_vms_returns_the_test_domain_as_ssos(daemon: Any, client: Client) -> None:
    reply = await raw_call(client, MANAGER_PATH, MANAGER, "ListVMs")
    assert reply.message_type is MessageType.METHOD_RETURN
    assert reply.signature == "a(ssos)"
    assert rows(reply.body[0]) == [["test", TEST_UUID, TEST_PATH, "running"]]


async def test_list_vms_is_sorted_by_name(
    start_daemon: Any, client: Client, tmp_path: Path
) -> None:
    names = write_unsorted_node(tmp_path / "node.xml")
    start_daemon(libvirt_uri=node_uri(tmp_path / "node.xml"))
    (vms,) = await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    assert [v[0] for v in vms] == sorted(names)
    for name, uuid, path, _state in vms:
        assert path == f"{ROOT}/vm/{uuid.replace('-', '_')}"
        assert await get_vm(client, name) == path


async def test_get_vm_by_name_and_by_uuid(daemon: Any, client: Client) -> None:
    assert await get_vm(client, "test") == TEST_PATH
    assert await get_vm(client, TEST_UUID) == TEST_PATH
    assert await get_vm(client, TEST_UUID.upper()) == TEST_PATH


async def test_get_vm_unknown_is_vm_not_found_naming_it(daemon: Any, client: Client) -> None:
    err = await expect_error(
        client, ERR + "VMNotFound", MANAGER_PATH, MANAGER, "GetVM", "s", ["nosuchvm"]
    )
    assert "nosuchvm" in err.text
    unknown_uuid = "00000000-0000-4000-8000-000000000000"
    err = await expect_error(
        client, ERR + "VMNotFound", MANAGER_PATH, MANAGER, "GetVM", "s", [unknown_uuid]
    )
    assert unknown_uuid in err.text


async def test_get_vm_rejects_hostile_strings_and_stays_up(daemon: Any, client: Client) -> None:
    for hostile in HOSTILE_NAMES:
        err = await expect_error(
            client, ERR + "InvalidArgument", MANAGER_PATH, MANAGER, "GetVM", "s", [hostile]
        )
        assert len(err.text) < 500, f"the message echoes too much: {len(err.text)} chars"
        assert "\x1b" not in err.text and "\x01" not in err.text
    assert daemon.proc.poll() is None
    assert await get_vm(client, "test") == TEST_PATH


# ---- ListErrors / ListJobs --------------------------------------------------------------


async def test_list_errors_is_the_contract_table(daemon: Any, client: Client) -> None:
    reply = await raw_call(client, MANAGER_PATH, MANAGER, "ListErrors")
    assert reply.signature == "a(ssbu)"
    expected = [
        [ERR + name, code, recoverable, number]
        for number, (name, code, recoverable) in enumerate(CONTRACT_ERRORS)
    ]
    assert len(expected) == 23
    assert rows(reply.body[0]) == expected


async def test_list_jobs_empty_then_lists_the_shutdown_job(daemon: Any, client: Client) -> None:
    assert await client.call(MANAGER_PATH, MANAGER, "ListJobs") == [[]]
    (job,) = await client.call(TEST_PATH, VM, "Shutdown", "a{sv}", [{}])
    reply = await raw_call(client, MANAGER_PATH, MANAGER, "ListJobs")
    assert reply.signature == "ao"
    assert reply.body == [[job]]


# ---- properties and the object tree -----------------------------------------------------


async def test_manager_properties_by_get_all(daemon: Any, client: Client) -> None:
    (props,) = await client.call(MANAGER_PATH, PROPERTIES, "GetAll", "s", [MANAGER])
    assert signatures(props) == MANAGER_PROPERTY_TYPES
    values = unwrap(props)
    assert values["APIVersion"] == 3  # 2, 3: issue 12's additions (spec.ADDITIONS)
    assert values["Connected"] is True
    assert values["LibvirtURI"] == "test:///default"
    assert values["Version"]
    assert isinstance(values["Features"], list)
    assert await client.get(MANAGER_PATH, MANAGER, "Connected") is True


async def test_get_managed_objects_has_manager_and_vm(daemon: Any, client: Client) -> None:
    reply = await raw_call(client, ROOT, OBJECT_MANAGER, "GetManagedObjects")
    assert reply.signature == "a{oa{sa{sv}}}"
    objects = reply.body[0]
    assert set(objects) == {MANAGER_PATH, TEST_PATH}
    assert signatures(objects[MANAGER_PATH][MANAGER]) == MANAGER_PROPERTY_TYPES
    assert set(objects[TEST_PATH]) == {VM}
    vm_props = objects[TEST_PATH][VM]
    assert signatures(vm_props) == VM_PROPERTY_TYPES
    values = unwrap(vm_props)
    assert values["Name"] == "test"
    assert values["UUID"] == TEST_UUID
    assert values["State"] == "running"
    assert values["Persistent"] is True
    assert values["VCPUs"] >= 1 and values["MemoryMiB"] >= 1
    assert values["GPUAddress"] == "" and values["LookingGlass"] is False
    assert values["GuestAgent"] in ("none", "disconnected", "connected")
    assert values["Owner"] == 0  # the test driver's own VM: defined outside neurond
    (direct,) = await client.call(TEST_PATH, PROPERTIES, "GetAll", "s", [VM])
    assert unwrap(direct) == values


# ---- bus-level errors -------------------------------------------------------------------


async def test_properties_set_is_read_only(daemon: Any, client: Client) -> None:
    await expect_error(
        client,
        DBUS_ERR + "PropertyReadOnly",
        MANAGER_PATH,
        PROPERTIES,
        "Set",
        "ssv",
        [MANAGER, "APIVersion", Variant("u", 4)],
    )
    await expect_error(
        client,
        DBUS_ERR + "PropertyReadOnly",
        TEST_PATH,
        PROPERTIES,
        "Set",
        "ssv",
        [VM, "Autostart", Variant("b", True)],
    )
    assert await client.get(MANAGER_PATH, MANAGER, "APIVersion") == 3
    assert await client.get(TEST_PATH, VM, "Autostart") is False


async def test_wrong_signature_is_invalid_args(daemon: Any, client: Client) -> None:
    await expect_error(client, DBUS_ERR + "InvalidArgs", MANAGER_PATH, MANAGER, "GetVM", "u", [7])
    await expect_error(
        client, DBUS_ERR + "InvalidArgs", MANAGER_PATH, MANAGER, "ListVMs", "s", ["extra"]
    )
    await expect_error(client, DBUS_ERR + "InvalidArgs", TEST_PATH, VM, "Start", "")
    assert await client.get(TEST_PATH, VM, "State") == "running"


async def test_unknown_method(daemon: Any, client: Client) -> None:
    await expect_error(client, DBUS_ERR + "UnknownMethod", MANAGER_PATH, MANAGER, "Frobnicate")
    await expect_error(client, DBUS_ERR + "UnknownMethod", TEST_PATH, VM, "Explode")


async def test_call_on_missing_vm_path_is_unknown_object(daemon: Any, client: Client) -> None:
    missing = f"{ROOT}/vm/00000000_0000_4000_8000_000000000000"
    await expect_error(client, DBUS_ERR + "UnknownObject", missing, VM, "Pause")
    await expect_error(
        client, DBUS_ERR + "UnknownObject", missing, PROPERTIES, "Get", "ss", [VM, "State"]
    )
    await expect_error(
        client, DBUS_ERR + "UnknownObject", f"{ROOT}/job/999", "org.neuronos.Neuron1.Job", "Cancel"
    )


# ---- Internal errors (fault hooks) ------------------------------------------------------


async def test_unexpected_failure_is_internal_without_traceback(
    start_daemon: Any, client: Client
) -> None:
    daemon = start_daemon(extra_args=["--test-hooks"], env={"NEUROND_FAULTS": "bus.ListVMs:error"})
    err = await expect_error(client, ERR + "Internal", MANAGER_PATH, MANAGER, "ListVMs")
    assert "Traceback" not in err.text
    assert ".py" not in err.text and "/neurond/" not in err.text
    assert "InjectedFault" not in err.text and "injected fault" not in err.text
    # The daemon keeps serving.
    assert daemon.proc.poll() is None
    assert await get_vm(client, "test") == TEST_PATH
    assert await client.get(MANAGER_PATH, MANAGER, "Connected") is True


async def test_faults_need_test_hooks(start_daemon: Any, client: Client) -> None:
    start_daemon(env={"NEUROND_FAULTS": "bus.ListVMs:error"})
    (vms,) = await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    assert [v[0] for v in vms] == ["test"]


# ---- many domains -----------------------------------------------------------------------


async def test_a_thousand_domains(start_daemon: Any, client: Client, tmp_path: Path) -> None:
    domains = make_test_node_xml(tmp_path / "node.xml", 1000)
    start_daemon(libvirt_uri=node_uri(tmp_path / "node.xml"))
    (vms,) = await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    assert len(vms) == 1000
    expected = [
        [
            d.name,
            d.uuid,
            f"{ROOT}/vm/{d.uuid.replace('-', '_')}",
            "running" if d.running else "shutoff",
        ]
        for d in sorted(domains, key=lambda d: d.name)
    ]
    assert rows(vms) == expected
    (objects,) = await client.call(ROOT, OBJECT_MANAGER, "GetManagedObjects")
    assert len(objects) == 1001
    assert MANAGER_PATH in objects
    for d in domains[:10]:
        props = objects[f"{ROOT}/vm/{d.uuid.replace('-', '_')}"][VM]
        assert props["Name"].value == d.name
        assert props["State"].value == ("running" if d.running else "shutoff")
