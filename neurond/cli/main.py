"""neuronctl: the command-line client of neurond, a pure D-Bus client.

``neuronctl [--system | --session] [--json] COMMAND [ARGS…]``. Exit status 0 on success; a
typed error exits with 10 + the error's number (API.md's table), printed as
``error: <message> [CODE]`` with a hint when the error is recoverable; a bus-level failure
exits 3, a usage error 2 (argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from neurond.errors import by_dbus_name

NAME = "org.neuronos.Neuron1"
ROOT = "/org/neuronos/Neuron1"
MANAGER_PATH = f"{ROOT}/Manager"
MANAGER = f"{NAME}.Manager"
VM = f"{NAME}.VM"
JOB = f"{NAME}.Job"
HARDWARE = f"{NAME}.Hardware"
PROPS = "org.freedesktop.DBus.Properties"
EXIT_BUS = 3
EXIT_ERROR_BASE = 10


class Failed(Exception):
    """An error reply from neurond or the bus."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(text)
        self.name, self.text = name, text


def exit_code(name: str) -> int:
    """Distinct per error name: 10 + its number; names neurond does not define are Internal."""
    cls = by_dbus_name(name)
    if cls is None:
        return EXIT_BUS if name.startswith("org.freedesktop.DBus.") else EXIT_ERROR_BASE + 18
    return EXIT_ERROR_BASE + cls.number


def plain(value: Any) -> Any:
    """Variants and nested containers as plain JSON-able values."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


class Client:
    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

    async def call(
        self, path: str, iface: str, member: str, sig: str = "", body: list[Any] | None = None
    ) -> list[Any]:
        reply = await self.bus.call(
            Message(
                destination=NAME,
                path=path,
                interface=iface,
                member=member,
                signature=sig,
                body=body or [],
                flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION,
            )
        )
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.signature == "s" else str(reply.body)
            raise Failed(reply.error_name or "", text)
        return list(reply.body)

    async def props(self, path: str, iface: str) -> dict[str, Any]:
        (values,) = await self.call(path, PROPS, "GetAll", "s", [iface])
        return {k: plain(v) for k, v in values.items()}

    async def vm_path(self, name: str) -> str:
        (path,) = await self.call(MANAGER_PATH, MANAGER, "GetVM", "s", [name])
        return str(path)

    async def wait_job(self, path: str, show: bool) -> dict[str, Any]:
        """Follow a job until it ends, with a progress bar on a terminal."""
        while True:
            try:
                job = await self.props(path, JOB)
            except Failed as e:
                if e.name.endswith("UnknownObject"):
                    return {"State": "completed", "ErrorName": "", "ErrorMessage": ""}
                raise
            if show and sys.stderr.isatty():
                bar = "#" * int(job["Progress"] * 30) if job["ProgressValid"] else "…"
                print(f"\r{job['Operation']} [{bar:<30}] {job['State']}", end="", file=sys.stderr)
            if job["State"] in ("completed", "failed", "cancelled"):
                if show and sys.stderr.isatty():
                    print(file=sys.stderr)
                return job
            await asyncio.sleep(0.2)


def table(rows: list[list[Any]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in lines
    )


def out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


async def cmd_list(c: Client, args: argparse.Namespace) -> None:
    (vms,) = await c.call(MANAGER_PATH, MANAGER, "ListVMs")
    data = [{"name": n, "uuid": u, "path": p, "state": s} for n, u, p, s in vms]
    out(args, data, table([[n, s, u] for n, u, _, s in vms], ["NAME", "STATE", "UUID"]))


async def cmd_show(c: Client, args: argparse.Namespace) -> None:
    props = await c.props(await c.vm_path(args.vm), VM)
    out(args, props, "\n".join(f"{k}: {v}" for k, v in sorted(props.items())))


async def cmd_vm_method(c: Client, args: argparse.Namespace) -> None:
    path = await c.vm_path(args.vm)
    member, sig, body = {
        "start": (
            "Start",
            "a{sv}",
            [{"paused": Variant("b", args.paused)} if getattr(args, "paused", False) else {}],
        ),
        "force-off": ("ForceOff", "", []),
        "pause": ("Pause", "", []),
        "resume": ("Resume", "", []),
        "reboot": ("Reboot", "", []),
        "reset": ("Reset", "", []),
    }[args.command]
    await c.call(path, VM, member, sig, body)
    out(args, {"vm": args.vm, "done": member}, f"{args.vm}: {member} done")


async def _run_job(c: Client, args: argparse.Namespace, job_path: str) -> None:
    job = await c.wait_job(job_path, show=not args.json)
    if job["State"] != "completed":
        raise Failed(job["ErrorName"] or f"{NAME}.Error.Internal", job["ErrorMessage"])
    out(args, {"job": job_path, "state": job["State"]}, f"{job_path}: {job['State']}")


async def cmd_shutdown(c: Client, args: argparse.Namespace) -> None:
    options: dict[str, Variant] = {"force": Variant("b", args.force)}
    if args.timeout is not None:
        options["timeout_s"] = Variant("u", args.timeout)
    (job,) = await c.call(await c.vm_path(args.vm), VM, "Shutdown", "a{sv}", [options])
    await _run_job(c, args, job)


# CreateVM spec keys neuronctl create passes through, with their D-Bus types.
CREATE_KEYS = {"vcpus": "u", "memory_mib": "t", "disk_gib": "t", "iso": "s", "gpu": "s",
               "kernel": "s", "initrd": "s", "cmdline": "s"}  # fmt: skip


async def cmd_create(c: Client, args: argparse.Namespace) -> None:
    spec = {"name": Variant("s", args.name), "profile": Variant("s", args.profile)}
    spec |= {k: Variant(t, getattr(args, k)) for k, t in CREATE_KEYS.items()
             if getattr(args, k) is not None}  # fmt: skip
    if args.looking_glass:
        spec["looking_glass"] = Variant("b", True)
    _vm, job = await c.call(MANAGER_PATH, MANAGER, "CreateVM", "a{sv}", [spec])
    await _run_job(c, args, job)


async def cmd_delete(c: Client, args: argparse.Namespace) -> None:
    options = {
        "delete_storage": Variant("b", args.delete_storage),
        "force": Variant("b", args.force),
    }
    (job,) = await c.call(await c.vm_path(args.vm), VM, "Delete", "a{sv}", [options])
    await _run_job(c, args, job)


async def cmd_download(c: Client, args: argparse.Namespace) -> None:
    options = {"sha256": Variant("s", args.sha256)}
    if args.filename:
        options["filename"] = Variant("s", args.filename)
    (job,) = await c.call(MANAGER_PATH, MANAGER, "DownloadImage", "sa{sv}", [args.url, options])
    await _run_job(c, args, job)


async def cmd_images(c: Client, args: argparse.Namespace) -> None:
    (images,) = await c.call(MANAGER_PATH, MANAGER, "ListImages")
    data = plain(images)
    names = {p: n for n, _, p, _ in (await c.call(MANAGER_PATH, MANAGER, "ListVMs"))[0]}
    for image in data:
        image["used_by_names"] = [names.get(p, p) for p in image["used_by"]]
    rows = [
        [i["name"], i["size"], i.get("sha256", "-"), ",".join(i["used_by_names"]) or "-"]
        for i in data
    ]
    out(args, data, table(rows, ["NAME", "SIZE", "SHA256", "USED BY"]))


async def cmd_delete_image(c: Client, args: argparse.Namespace) -> None:
    await c.call(MANAGER_PATH, MANAGER, "DeleteImage", "s", [args.name])
    out(args, {"image": args.name, "deleted": True}, f"{args.name}: deleted")


async def cmd_media(c: Client, args: argparse.Namespace) -> None:
    path = await c.vm_path(args.vm)
    if args.command == "eject":
        await c.call(path, VM, "EjectMedia")
        out(args, {"vm": args.vm, "media": ""}, f"{args.vm}: CD-ROM ejected")
    else:
        await c.call(path, VM, "ChangeMedia", "s", [args.iso])
        out(args, {"vm": args.vm, "media": args.iso}, f"{args.vm}: {args.iso} inserted")


async def cmd_jobs(c: Client, args: argparse.Namespace) -> None:
    (paths,) = await c.call(MANAGER_PATH, MANAGER, "ListJobs")
    jobs = [{"path": p, **await c.props(p, JOB)} for p in paths]
    rows = [
        [j["path"].rsplit("/", 1)[1], j["Operation"], j["State"], f"{j['Progress']:.0%}"]
        for j in jobs
    ]
    out(args, jobs, table(rows, ["JOB", "OPERATION", "STATE", "PROGRESS"]))


async def cmd_errors(c: Client, args: argparse.Namespace) -> None:
    (rows,) = await c.call(MANAGER_PATH, MANAGER, "ListErrors")
    data = [{"name": n, "code": code, "recoverable": r, "number": num} for n, code, r, num in rows]
    out(
        args,
        data,
        table(
            [[num, code, "yes" if r else "no", n] for n, code, r, num in rows],
            ["#", "CODE", "RECOVERABLE", "NAME"],
        ),
    )


async def cmd_hw(c: Client, args: argparse.Namespace) -> None:
    (iommu,) = await c.call(MANAGER_PATH, HARDWARE, "GetIOMMUStatus")
    (gpus,) = await c.call(MANAGER_PATH, HARDWARE, "ListGPUs")
    data = {"iommu": plain(iommu), "gpus": plain(gpus)}
    lines = [
        f"IOMMU: {'on' if data['iommu']['enabled'] else 'off'}"
        + (f" (add {data['iommu']['kernel_param']})" if data["iommu"]["kernel_param"] else "")
    ]
    for g in data["gpus"]:
        ready = "ready" if g["passthrough_ready"] else "not ready"
        lines.append(f"{g['address']}  {g['vendor']} {g['name']}  {ready}")
        lines += [f"  - {r}" for r in g["reasons"]] + [f"  ! {w}" for w in g["warnings"]]
    out(args, data, "\n".join(lines))


async def cmd_watch(c: Client, args: argparse.Namespace) -> None:
    """Print state changes as they happen, until interrupted."""
    await c.bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[f"type='signal',sender='{NAME}'"],
        )
    )
    names = {p: n for n, _, p, _ in (await c.call(MANAGER_PATH, MANAGER, "ListVMs"))[0]}

    def on_signal(msg: Message) -> bool:
        if msg.message_type is not MessageType.SIGNAL:
            return False
        if msg.member == "PropertiesChanged" and msg.body[0] == VM:
            changed = plain(msg.body[1])
            if "State" in changed:
                vm = names.get(msg.path or "", msg.path)
                event = {"vm": vm, "state": changed["State"], "reason": changed.get("StateReason")}
                # One JSON object per line: a stream a script can read line by line.
                print(
                    json.dumps(event)
                    if args.json
                    else f"{vm}: {event['state']} ({event['reason']})"
                )
                sys.stdout.flush()
        elif msg.member == "InterfacesAdded" and VM in msg.body[1]:
            names[msg.body[0]] = msg.body[1][VM]["Name"].value
        return False

    c.bus.add_message_handler(on_signal)
    await asyncio.Event().wait()


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], Coroutine[Any, Any, None]]] = {
    "list": cmd_list, "show": cmd_show, "start": cmd_vm_method, "force-off": cmd_vm_method,
    "pause": cmd_vm_method, "resume": cmd_vm_method, "reboot": cmd_vm_method,
    "reset": cmd_vm_method, "shutdown": cmd_shutdown, "stop": cmd_shutdown, "jobs": cmd_jobs,
    "errors": cmd_errors, "hw": cmd_hw, "watch": cmd_watch, "create": cmd_create,
    "delete": cmd_delete, "download": cmd_download, "images": cmd_images,
    "delete-image": cmd_delete_image, "media": cmd_media, "eject": cmd_media,
}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuronctl", description="Control neurond's VMs over D-Bus.")
    bus = p.add_mutually_exclusive_group()
    bus.add_argument("--system", dest="session", action="store_false", default=False)
    bus.add_argument("--session", dest="session", action="store_true")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="all VMs")
    for name in ("show", "force-off", "pause", "resume", "reboot", "reset"):
        sub.add_parser(name).add_argument("vm")
    start = sub.add_parser("start")
    start.add_argument("vm")
    start.add_argument("--paused", action="store_true")
    for name in ("shutdown", "stop"):
        s = sub.add_parser(name, help="ACPI shutdown, waiting for the VM to be off")
        s.add_argument("vm")
        s.add_argument("--timeout", type=int)
        s.add_argument("--force", action="store_true", help="destroy after the timeout")
    create = sub.add_parser("create", help="create a VM (waits for the create job)")
    create.add_argument("name")
    create.add_argument(
        "--profile", default="generic", choices=["windows11", "windows10", "linux", "generic"]
    )
    create.add_argument("--vcpus", type=int)
    create.add_argument("--memory-mib", dest="memory_mib", type=int)
    create.add_argument("--disk-gib", dest="disk_gib", type=int)
    create.add_argument("--looking-glass", action="store_true")
    for key in ("iso", "gpu", "kernel", "initrd", "cmdline"):
        create.add_argument(f"--{key}")
    delete = sub.add_parser("delete", help="delete a VM (waits for the delete job)")
    delete.add_argument("vm")
    delete.add_argument("--delete-storage", action="store_true")
    delete.add_argument("--force", action="store_true", help="stop a running VM first")
    download = sub.add_parser("download", help="download an image into the image directory")
    download.add_argument("url")
    download.add_argument("--sha256", required=True)
    download.add_argument("--filename")
    sub.add_parser("images", help="the files in the image directory, with the VMs using them")
    sub.add_parser("delete-image", help="delete an image no VM uses").add_argument("name")
    media = sub.add_parser("media", help="insert an ISO into a VM's CD-ROM")
    media.add_argument("vm")
    media.add_argument("iso", help="absolute path under an ISO root")
    sub.add_parser("eject", help="empty a VM's CD-ROM").add_argument("vm")
    for name in ("jobs", "errors", "hw", "watch"):
        sub.add_parser(name)
    return p


async def run(args: argparse.Namespace) -> int:
    try:
        bus = await MessageBus(
            bus_type=BusType.SESSION if args.session else BusType.SYSTEM
        ).connect()
    except (OSError, ValueError) as e:
        print(f"error: cannot connect to the bus: {e}", file=sys.stderr)
        return EXIT_BUS
    try:
        await COMMANDS[args.command](Client(bus), args)
        return 0
    except Failed as e:
        cls = by_dbus_name(e.name)
        code = cls.code if cls else e.name
        print(f"error: {e.text} [{code}]", file=sys.stderr)
        if cls is not None and cls.recoverable:
            print("hint: this can be fixed or retried; see the message above.", file=sys.stderr)
        return exit_code(e.name)
    finally:
        bus.disconnect()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
