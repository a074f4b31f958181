"""ListImages and DeleteImage through D-Bus (issue 12): the image directory's files, the sha256 a
download verified, the VMs using each file, and deletion refused while a VM or a download uses
it. Downloads come from the loopback HTTPS server of tests/download_server.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from dbus_fast import Variant

from tests.bus.conftest import ERR, HOOKS, MANAGER, MANAGER_PATH, VM, CallFailed, Client
from tests.bus.test_create import QEMU, create, created, wait_job
from tests.bus.test_downloads import MiB, download, finish
from tests.download_server import FileServer, sha256_of
from tests.harness import Daemon, PrivateBus, gdbus


@pytest.fixture(scope="module")
def server() -> Iterator[FileServer]:
    with FileServer(trustme.CA()) as s:
        yield s


def start(start_daemon: Any, tmp_path: Path, server: FileServer | None = None, **kw: Any) -> Daemon:
    """neurond on the test driver; its image directory is an ISO root; it trusts ``server``
    (``kw``: Daemon's other arguments)."""
    images = tmp_path / "images"
    images.mkdir()
    config: dict[str, Any] = {
        **QEMU,
        "storage": {"image_dir": str(images), "iso_roots": [str(images)]},
    }
    if server is not None:
        config["downloads"] = {"ca_bundle": str(server.write_ca(tmp_path / "ca.pem"))}
    d: Daemon = start_daemon(config=config, **kw)
    d.image_dir = images  # what the tests look at
    return d


async def list_images(client: Client) -> dict[str, dict[str, Any]]:
    (images,) = await client.call(MANAGER_PATH, MANAGER, "ListImages")
    return {i["name"].value: {k: v.value for k, v in i.items() if k != "name"} for i in images}


async def downloaded(client: Client, server: FileServer, size: int) -> str:
    """DownloadImage of ``dl.iso`` (``size`` bytes) with its sha256, completed; the sha256."""
    digest = sha256_of(size)
    job = await download(client, server.url("dl.iso", size=size), sha256=Variant("s", digest))
    assert (await finish(client, job))["State"] == "completed"
    return digest


async def delete_fails(client: Client, name: str) -> CallFailed:
    with pytest.raises(CallFailed) as e:
        await client.call(MANAGER_PATH, MANAGER, "DeleteImage", "s", [name])
    return e.value


async def test_list_shows_regular_files_only(
    start_daemon: Any, client: Client, tmp_path: Path
) -> None:
    d = start(start_daemon, tmp_path)
    assert await list_images(client) == {}
    (d.image_dir / "a.iso").write_bytes(b"a" * 1000)
    (d.image_dir / "b.qcow2").write_bytes(b"")
    (d.image_dir / ".a.iso.x.part").write_bytes(b"partial")  # a download's temporary file
    (d.image_dir / "subdir").mkdir()
    (tmp_path / "outside.iso").write_bytes(b"o")
    (d.image_dir / "link.iso").symlink_to(tmp_path / "outside.iso")
    (d.image_dir / "dangling.iso").symlink_to(tmp_path / "nothing")
    (d.image_dir / "wéird name.iso").write_bytes(b"w")
    assert await list_images(client) == {
        "a.iso": {"size": 1000, "used_by": []},
        "b.qcow2": {"size": 0, "used_by": []},
        "wéird name.iso": {"size": 1, "used_by": []},
    }


async def test_sha256_is_known_from_a_download_until_the_file_changes(
    start_daemon: Any, client: Client, tmp_path: Path, server: FileServer
) -> None:
    d = start(start_daemon, tmp_path, server)
    size = 2 * MiB
    digest = await downloaded(client, server, size)
    (d.image_dir / "copied.iso").write_bytes((d.image_dir / "dl.iso").read_bytes())
    images = await list_images(client)
    assert images["dl.iso"] == {"size": size, "sha256": digest, "used_by": []}
    assert images["copied.iso"] == {"size": size, "used_by": []}  # nobody verified it
    # the same download again completes at once (the file is there) and keeps the sha256
    assert await downloaded(client, server, size) == digest
    assert (await list_images(client))["dl.iso"]["sha256"] == digest
    # changed by hand: the recorded checksum no longer counts
    with open(d.image_dir / "dl.iso", "ab") as f:
        f.write(b"x")
    assert (await list_images(client))["dl.iso"] == {"size": size + 1, "used_by": []}


@pytest.mark.parametrize("index", [b"{not json", b"[1, 2]", b'{"dl.iso": 5}', b"\xff\xfe"])
async def test_a_corrupt_index_only_loses_checksums(
    start_daemon: Any, client: Client, tmp_path: Path, server: FileServer, index: bytes
) -> None:
    d = start(start_daemon, tmp_path, server)
    size = MiB
    await downloaded(client, server, size)
    (d.state_dir / "images.json").write_bytes(index)
    assert await list_images(client) == {"dl.iso": {"size": size, "used_by": []}}
    await client.call(MANAGER_PATH, MANAGER, "DeleteImage", "s", ["dl.iso"])
    assert await list_images(client) == {}


async def test_an_index_entry_of_another_shape_is_ignored(
    start_daemon: Any, client: Client, tmp_path: Path
) -> None:
    d = start(start_daemon, tmp_path)
    (d.image_dir / "a.iso").write_bytes(b"a")
    st = (d.image_dir / "a.iso").stat()
    entry = {"sha256": 42, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    (d.state_dir / "images.json").write_text(json.dumps({"a.iso": entry}))
    assert await list_images(client) == {"a.iso": {"size": 1, "used_by": []}}


async def test_delete_removes_the_file_and_its_checksum(
    start_daemon: Any, client: Client, tmp_path: Path, server: FileServer
) -> None:
    d = start(start_daemon, tmp_path, server)
    size = MiB
    await downloaded(client, server, size)
    assert "dl.iso" in json.loads((d.state_dir / "images.json").read_text())
    await client.call(MANAGER_PATH, MANAGER, "DeleteImage", "s", ["dl.iso"])
    assert not (d.image_dir / "dl.iso").exists()
    assert json.loads((d.state_dir / "images.json").read_text()) == {}
    assert await list_images(client) == {}
    e = await delete_fails(client, "dl.iso")  # gone now
    assert e.name == ERR + "InvalidArgument", e
    assert "no image named 'dl.iso'" in e.text, e.text


async def test_bad_names_are_invalid_argument_and_delete_nothing(
    start_daemon: Any, client: Client, tmp_path: Path
) -> None:
    d = start(start_daemon, tmp_path)
    (d.image_dir / "keep.iso").write_bytes(b"k")
    (d.image_dir / ".hidden").write_bytes(b"h")
    (d.image_dir / "subdir").mkdir()
    (d.image_dir / "subdir" / "inner.iso").write_bytes(b"i")
    victim = tmp_path / "victim.iso"
    victim.write_bytes(b"v")
    (d.image_dir / "link.iso").symlink_to(victim)
    bad = [
        "", ".", "..", ".hidden", "../victim.iso", "subdir/inner.iso", "subdir", "link.iso",
        "/etc/passwd", str(victim), "x" * 256, "é" * 128, "a\nb", "a\tb", "missing.iso",
        "keep.iso/", "keep.iso/.",
    ]  # fmt: skip
    for name in bad:
        e = await delete_fails(client, name)
        assert e.name == ERR + "InvalidArgument", (name, e)
        assert len(e.text) < 400, e.text
    assert victim.exists() and (d.image_dir / "link.iso").is_symlink()
    assert (d.image_dir / "subdir" / "inner.iso").exists()
    assert sorted(p.name for p in d.image_dir.iterdir()) == [
        ".hidden", "keep.iso", "link.iso", "subdir"
    ]  # fmt: skip


async def test_an_image_in_use_is_refused_naming_the_vm(
    start_daemon: Any, client: Client, tmp_path: Path
) -> None:
    d = start(start_daemon, tmp_path)
    iso = d.image_dir / "install.iso"
    iso.write_bytes(b"\0" * 4096)
    vm = await created(client, name="win11", iso=str(iso))
    other = await created(client, name="adobe", iso=str(iso))
    for name in ("vmlinuz", "initrd.img"):
        (d.image_dir / name).write_bytes(b"k")
    kernel, initrd = str(d.image_dir / "vmlinuz"), str(d.image_dir / "initrd.img")
    direct = await created(client, name="direct", kernel=kernel, initrd=initrd)
    images = await list_images(client)
    assert sorted(images["install.iso"]["used_by"]) == sorted([vm, other])
    e = await delete_fails(client, "install.iso")
    assert e.name == ERR + "InvalidState", e
    assert "'adobe', 'win11'" in e.text, e.text
    for name in ("vmlinuz", "initrd.img"):  # a direct kernel boot's files are in use too
        assert images[name]["used_by"] == [direct]
        e = await delete_fails(client, name)
        assert e.name == ERR + "InvalidState", e
        assert "'direct'" in e.text, e.text
    assert iso.exists()
    await client.call(vm, VM, "EjectMedia")
    await client.call(other, VM, "EjectMedia")
    assert (await list_images(client))["install.iso"]["used_by"] == []
    await client.call(MANAGER_PATH, MANAGER, "DeleteImage", "s", ["install.iso"])
    assert not iso.exists()


async def test_an_image_a_vm_being_created_refers_to_is_in_use(
    start_daemon: Any, client: Client, tmp_path: Path
) -> None:
    """A VM being created (its define step held by a delay fault: no domain yet) uses its ISO,
    kernel and initrd already: deleting one would leave the new VM without it."""
    faults = {"NEUROND_FAULTS": "create.define:delay:3"}
    d = start(start_daemon, tmp_path, extra_args=HOOKS, env=faults)
    for name in ("install.iso", "vmlinuz", "initrd.img"):
        (d.image_dir / name).write_bytes(b"\0" * 4096)
    iso, kernel, initrd = (str(d.image_dir / n) for n in ("install.iso", "vmlinuz", "initrd.img"))
    vm, job = await create(client, name="new", iso=iso)
    direct, direct_job = await create(client, name="direct", kernel=kernel, initrd=initrd)
    images = await list_images(client)
    assert images["install.iso"]["used_by"] == [vm]
    assert images["vmlinuz"]["used_by"] == images["initrd.img"]["used_by"] == [direct]
    for name, user in (("install.iso", "new"), ("vmlinuz", "direct"), ("initrd.img", "direct")):
        e = await delete_fails(client, name)
        assert e.name == ERR + "InvalidState", e
        assert f"'{user}'" in e.text, e.text
    assert await wait_job(client, job) == ("completed", "")
    assert await wait_job(client, direct_job) == ("completed", "")
    assert (await list_images(client))["install.iso"]["used_by"] == [vm]
    assert sorted(p.name for p in d.image_dir.iterdir() if not p.name.endswith(".qcow2")) == [
        "initrd.img",
        "install.iso",
        "vmlinuz",
    ]


async def test_an_image_checked_by_a_create_not_yet_registered_is_in_use(
    start_daemon: Any, client: Client, tmp_path: Path
) -> None:
    """Between CreateVM checking its ISO and the new VM appearing (held here by a delay fault
    before the host check), DeleteImage waits and then refuses: the ISO is not deleted."""
    d = start(
        start_daemon, tmp_path, extra_args=HOOKS, env={"NEUROND_FAULTS": "create.host:delay:1"}
    )
    (d.image_dir / "install.iso").write_bytes(b"\0" * 4096)
    creating = asyncio.ensure_future(
        create(client, name="new", iso=str(d.image_dir / "install.iso"))
    )
    await asyncio.sleep(0.3)  # CreateVM has checked the ISO and waits at create.host
    assert not creating.done()
    e = await delete_fails(client, "install.iso")
    assert e.name == ERR + "InvalidState", e
    assert "'new'" in e.text, e.text
    vm, job = await creating
    assert await wait_job(client, job) == ("completed", "")
    assert (await list_images(client))["install.iso"]["used_by"] == [vm]


async def test_an_image_being_downloaded_is_refused(
    start_daemon: Any, client: Client, tmp_path: Path, server: FileServer
) -> None:
    start(start_daemon, tmp_path, server)
    url = server.url("slow.iso", size=8 * MiB, stall=0.25)
    job = await download(client, url, sha256=Variant("s", sha256_of(8 * MiB)))
    e = await delete_fails(client, "slow.iso")
    assert e.name == ERR + "InvalidState", e
    assert f"job {job.rsplit('/', 1)[1]}" in e.text, e.text
    await client.call(job, "org.neuronos.Neuron1.Job", "Cancel")
    assert (await finish(client, job))["State"] == "cancelled"
    e = await delete_fails(client, "slow.iso")  # the job is over and left no file
    assert e.name == ERR + "InvalidArgument", e


@pytest.mark.parametrize(("member", "args"), [("ListImages", ()), ("DeleteImage", ("'a.iso'",))])
async def test_nobody_is_refused(
    private_bus: PrivateBus,
    start_daemon: Any,
    client: Client,
    tmp_path: Path,
    member: str,
    args: tuple[str, ...],
) -> None:
    d = start(start_daemon, tmp_path)
    (d.image_dir / "a.iso").write_bytes(b"a")
    out = gdbus(
        private_bus, "call", "--dest", "org.neuronos.Neuron1", "--object-path", MANAGER_PATH,
        "--method", f"{MANAGER}.{member}", *args, as_nobody=True, timeout=15,
    )  # fmt: skip
    assert out.returncode != 0 and "PermissionDenied" in out.stderr, out.stderr
    assert "org.neuronos.neuron1.vm-manage" in out.stderr, out.stderr
    assert (d.image_dir / "a.iso").exists()
