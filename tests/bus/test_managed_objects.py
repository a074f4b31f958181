"""GetManagedObjects is assembled from cached, pre-marshalled entries (neurond/bus/router.py):
a change made after a read must show in the next read, for every kind of change: a property
of a VM, a new object, a changed object, a removed object; and every object's entry must equal
what Properties.GetAll says of it at that moment.
"""

from __future__ import annotations

from typing import Any

from tests.bus.conftest import (
    JOB,
    MANAGER,
    MANAGER_PATH,
    OBJECT_MANAGER,
    PROPERTIES,
    ROOT,
    TEST_PATH,
    VM,
    Client,
)


async def managed(client: Client) -> dict[str, dict[str, dict[str, Any]]]:
    (objects,) = await client.call(ROOT, OBJECT_MANAGER, "GetManagedObjects")
    return {
        path: {iface: {k: v.value for k, v in props.items()} for iface, props in ifaces.items()}
        for path, ifaces in objects.items()
    }


async def agrees_with_get_all(client: Client) -> dict[str, dict[str, dict[str, Any]]]:
    """One GetManagedObjects whose every entry equals GetAll of that object and each property's
    Get (Get reads the live values, never a cache); read right after, nothing changes meanwhile.
    """
    objects = await managed(client)
    for path, ifaces in objects.items():
        for iface, props in ifaces.items():
            (fresh,) = await client.call(path, PROPERTIES, "GetAll", "s", [iface])
            assert {k: v.value for k, v in fresh.items()} == props, (path, iface)
            for name, value in props.items():
                assert await client.get(path, iface, name) == value, (path, iface, name)
    return objects


async def test_changes_after_a_cached_read_are_seen(start_daemon: Any, client: Client) -> None:
    start_daemon(config={"jobs": {"linger_s": 0.3}})
    first = await agrees_with_get_all(client)
    assert set(first) == {MANAGER_PATH, TEST_PATH}
    assert first[MANAGER_PATH][MANAGER]["Connected"] is True
    assert await managed(client) == first  # served from the cache: the same answer

    # A property of a VM (signalled on the listener path).
    await client.call(TEST_PATH, VM, "Pause")
    objects = await agrees_with_get_all(client)
    assert objects[TEST_PATH][VM]["State"] == "paused"
    assert objects[TEST_PATH][VM]["StateReason"] == "user"
    await client.call(TEST_PATH, VM, "SetAutostart", "b", [True])
    objects = await agrees_with_get_all(client)
    assert objects[TEST_PATH][VM]["Autostart"] is True

    # A new object (a job), its changes, and its removal.
    await client.call(TEST_PATH, VM, "Resume")
    (job,) = await client.call(TEST_PATH, VM, "Shutdown", "a{sv}", [{}])
    objects = await managed(client)  # (the VM moves on meanwhile: no GetAll comparison)
    assert set(objects) == {MANAGER_PATH, TEST_PATH, job}
    assert objects[job][JOB]["Operation"] == "shutdown-vm"
    assert objects[job][JOB]["Objects"] == [TEST_PATH]
    await client.wait_for(
        lambda: any(m.member == "Completed" and m.path == job for m in client.signals)
    )
    objects = await agrees_with_get_all(client)
    assert objects[job][JOB]["State"] == "completed"
    assert objects[TEST_PATH][VM]["State"] == "shutoff"
    await client.wait_for(
        lambda: any(m.member == "InterfacesRemoved" and m.body[0] == job for m in client.signals)
    )
    objects = await agrees_with_get_all(client)
    assert set(objects) == {MANAGER_PATH, TEST_PATH}
