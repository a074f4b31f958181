"""neurond against libvirt-dbus (and a trivial dbus-fast echo service), side by side.

    .venv/bin/python bench/compare.py [--sizes 10,100,1000] [--runs 5] [--only list,single,...]

Everything runs on one private system-type bus (tests/harness.py PrivateBus with the system
policies, so libvirt-dbus may own org.libvirt): neurond (subprocess, READY=1 via
NOTIFY_SOCKET), `/usr/sbin/libvirt-dbus --system` (needs root) and bench/helpers/echo_service.py
(the floor). The client is this process, dbus-fast low-level `Message` calls, the same code
path for every service. Every comparison is measured in the same run, rounds interleaved in
ABBA order (abba()); figures are medians over `--runs` rounds; each table carries the load
average. Backend: libvirt's test driver. libvirt-dbus has
no URI option and serves test:///default at /org/libvirt/Test, so for the N-domain lists
this script defines the same N domains (names, UUIDs, 64 MiB, every 2nd running) into
libvirt-dbus's test connection with DomainDefineXML + Create and removes the stock `test`
domain, while neurond opens a test-driver node file with those N domains: both daemons then
answer from libvirt's test driver holding identical domains. Section "libvirtd" repeats the
VM list on real libvirtd (qemu:///system at /org/libvirt/QEMU for libvirt-dbus), under
flock /tmp/neurond-libvirtd.lock, with shut-off bench-NNNN domains it defines and removes;
section "virsh" times `virsh suspend`/`resume` of a running tiny guest (TESTING.md) to each
daemon's signal, against this process's own libvirt event.
Prints Markdown; never asserts on timings (benchmarks never do).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dbus_fast import Message, MessageType, Variant  # noqa: E402
from dbus_fast.aio import MessageBus  # noqa: E402

from tests.harness import Daemon, PrivateBus, make_test_node_xml, node_uri  # noqa: E402

N_NAME = "org.neuronos.Neuron1"
N_ROOT = "/org/neuronos/Neuron1"
N_MANAGER_PATH = f"{N_ROOT}/Manager"
N_MANAGER = "org.neuronos.Neuron1.Manager"
N_VM = "org.neuronos.Neuron1.VM"
L_NAME = "org.libvirt"
L_TEST = "/org/libvirt/Test"
L_CONNECT = "org.libvirt.Connect"
L_DOMAIN = "org.libvirt.Domain"
E_NAME = "org.neuronos.BenchEcho"
E_PATH = "/org/neuronos/BenchEcho"
PROPS = "org.freedesktop.DBus.Properties"
OM = "org.freedesktop.DBus.ObjectManager"
TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # the test driver's stock domain "test"
TEST_PATH = f"{N_ROOT}/vm/{TEST_UUID.replace('-', '_')}"
L_CONN = [L_TEST]  # the libvirt-dbus connection the VM-list methods read
ALL_SECTIONS = ("list", "libvirtd", "virsh", "single", "lifecycle", "events", "cost")

# org.libvirt.conf lets only the libvirtdbus user own org.libvirt; libvirt-dbus --system runs
# as root here (it must, to reach qemu:///system), so root may own it on this private bus.
ECHO_POLICY = f"""
  <policy user="root"><allow own="{E_NAME}"/><allow own="{L_NAME}"/></policy>
  <policy context="default"><allow send_destination="{E_NAME}"/></policy>
"""


class CallError(Exception):
    pass


async def call(
    bus: MessageBus, dest: str, path: str, iface: str, member: str,
    signature: str = "", body: list[Any] | None = None,
) -> list[Any]:  # fmt: skip
    reply = await bus.call(
        Message(destination=dest, path=path, interface=iface, member=member,
                signature=signature, body=body or [])
    )  # fmt: skip
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        raise CallError(f"{dest} {member}: {reply.error_name} {reply.body}")
    return list(reply.body)


def load() -> str:
    """The load average now: other work on the same CPUs moves every figure."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))] if s else float("nan")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the services under test ---------------------------------------------------------------


class Proc:
    """A service subprocess on the bus (libvirt-dbus or the echo service)."""

    def __init__(self, cmd: list[str], bus: PrivateBus) -> None:
        self.proc = subprocess.Popen(
            cmd, env=bus.env(), cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def wait_name(client: MessageBus, name: str, proc: Proc, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"{name}: service exited with {proc.proc.returncode}")
        [has] = await call(client, "org.freedesktop.DBus", "/org/freedesktop/DBus",
                           "org.freedesktop.DBus", "NameHasOwner", "s", [name])  # fmt: skip
        if has:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{name} did not appear on the bus")


async def start_libvirt_dbus(bus: PrivateBus, client: MessageBus) -> Proc:
    p = Proc(["/usr/sbin/libvirt-dbus", "--system"], bus)
    await wait_name(client, L_NAME, p)
    # The Test object exists once its connection is open: ping it.
    await call(client, L_NAME, L_TEST, PROPS, "Get", "ss", [L_CONNECT, "Version"])
    return p


async def start_echo(bus: PrivateBus, client: MessageBus) -> Proc:
    p = Proc([sys.executable, str(ROOT / "bench" / "helpers" / "echo_service.py")], bus)
    await wait_name(client, E_NAME, p)
    return p


def domain_xml(name: str, uuid: str) -> str:
    return (f"<domain type='test'><name>{name}</name><uuid>{uuid}</uuid>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64'>hvm</type></os></domain>")  # fmt: skip


async def populate_libvirt_dbus(client: MessageBus, node: list[Any]) -> None:
    """Make libvirt-dbus's test:///default hold exactly the node file's domains."""
    [test] = await call(client, L_NAME, L_TEST, L_CONNECT, "DomainLookupByName", "s", ["test"])
    await call(client, L_NAME, test, L_DOMAIN, "Destroy", "u", [0])
    await call(client, L_NAME, test, L_DOMAIN, "Undefine", "u", [0])

    async def one(d: Any) -> None:
        [path] = await call(client, L_NAME, L_TEST, L_CONNECT, "DomainDefineXML", "s",
                            [domain_xml(d.name, d.uuid)])  # fmt: skip
        if d.running:
            await call(client, L_NAME, path, L_DOMAIN, "Create", "u", [0])

    for i in range(0, len(node), 50):
        await asyncio.gather(*(one(d) for d in node[i : i + 50]))


# -- 1. VM list ----------------------------------------------------------------------------


async def n_get_managed_objects(c: MessageBus) -> list[tuple[Any, ...]]:
    [objs] = await call(c, N_NAME, N_ROOT, OM, "GetManagedObjects")
    out = []
    for ifaces in objs.values():
        vm = ifaces.get(N_VM)
        if vm is not None:
            out.append((vm["Name"].value, vm["UUID"].value, vm["State"].value,
                        vm["MemoryMiB"].value))  # fmt: skip
    return out


async def n_list_vms(c: MessageBus) -> list[tuple[Any, ...]]:
    [vms] = await call(c, N_NAME, N_MANAGER_PATH, N_MANAGER, "ListVMs")
    return [(name, uuid, state) for name, uuid, _path, state in vms]


async def _l_one(c: MessageBus, path: str) -> tuple[Any, ...]:
    [props] = await call(c, L_NAME, path, PROPS, "GetAll", "s", [L_DOMAIN])
    [[state, _reason]] = await call(c, L_NAME, path, L_DOMAIN, "GetState", "u", [0])
    return (props["Name"].value, props["UUID"].value, state)


async def l_cockpit_sequential(c: MessageBus) -> list[tuple[Any, ...]]:
    [paths] = await call(c, L_NAME, L_CONN[0], L_CONNECT, "ListDomains", "u", [0])
    return [await _l_one(c, p) for p in paths]


PIPELINE = 32  # dbus-fast's client drops its connection when a write meets a full socket


async def l_cockpit_parallel(c: MessageBus) -> list[tuple[Any, ...]]:
    [paths] = await call(c, L_NAME, L_CONN[0], L_CONNECT, "ListDomains", "u", [0])
    window = asyncio.Semaphore(PIPELINE)

    async def one(p: str) -> tuple[Any, ...]:
        async with window:
            return await _l_one(c, p)

    return list(await asyncio.gather(*(one(p) for p in paths)))


STATS_STATE, STATS_BALLOON = 1, 4


async def l_all_domain_stats(c: MessageBus) -> list[tuple[Any, ...]]:
    [records] = await call(c, L_NAME, L_CONN[0], L_CONNECT, "GetAllDomainStats", "uu",
                           [STATS_STATE | STATS_BALLOON, 0])  # fmt: skip
    return [(name, stats.get("state.state", Variant("i", -1)).value,
             stats.get("balloon.maximum", Variant("t", 0)).value)
            for name, stats in records]  # fmt: skip


LIST_METHODS: dict[str, Callable[[MessageBus], Awaitable[list[tuple[Any, ...]]]]] = {
    "neurond GetManagedObjects": n_get_managed_objects,
    "neurond ListVMs": n_list_vms,
    "libvirt-dbus Cockpit way, sequential": l_cockpit_sequential,
    "libvirt-dbus Cockpit way, 32 in flight": l_cockpit_parallel,
    "libvirt-dbus GetAllDomainStats": l_all_domain_stats,
}


def abba(items: list[Any], round_: int) -> list[Any]:
    """The order of one round: forwards, then backwards (ABC CBA ...), so that a machine
    getting busier or quieter during a run (other work on the same CPUs) weighs on every
    service alike."""
    return items if round_ % 2 == 0 else items[::-1]


async def interleaved(c: MessageBus, runs: int, expected: int) -> dict[str, list[float]]:
    """Every VM-list method once per round, rounds in ABBA order; seconds per call."""
    times: dict[str, list[float]] = {k: [] for k in LIST_METHODS}
    for r in range(runs):
        for name in abba(list(LIST_METHODS), r):
            t = time.perf_counter()
            got = await LIST_METHODS[name](c)
            times[name].append(time.perf_counter() - t)
            if len(got) != expected:
                raise RuntimeError(f"{name}: {len(got)} VMs, expected {expected}")
    return times


async def bench_list(bus: PrivateBus, c: MessageBus, sizes: list[int], runs: int,
                     work: Path, out: dict[str, Any]) -> None:  # fmt: skip
    print("\n### VM list: every VM's name, UUID, state (and memory), test driver\n")
    print(f"({load()})\n")
    print("| domains | method | median ms | vs neurond GetManagedObjects |")
    print("|---|---|---|---|")
    for n in sizes:
        node_path = work / f"node{n}.xml"
        node = make_test_node_xml(node_path, n)
        lv = await start_libvirt_dbus(bus, c)
        t0 = time.perf_counter()
        await populate_libvirt_dbus(c, node)
        define_s = time.perf_counter() - t0
        daemon = Daemon(bus, libvirt_uri=node_uri(node_path)).start()
        try:
            times = await interleaved(c, runs, n)
            base = median(times["neurond GetManagedObjects"])
            for name, ts in times.items():
                print(f"| {n} | {name} | {median(ts) * 1e3:.2f} | {median(ts) / base:.1f}x |")
            out.setdefault("list", {})[n] = {k: median(v) for k, v in times.items()}
            out.setdefault("rss", {})[n] = (rss_mib(daemon.pid), rss_mib(lv.pid))
            out.setdefault("define_s", {})[n] = define_s
        finally:
            daemon.close()
            lv.stop()
    print("\nRSS after the list calls (MiB), and time to define the domains in libvirt-dbus:\n")
    print("| domains | neurond RSS | libvirt-dbus RSS | DomainDefineXML+Create of all, s |")
    print("|---|---|---|---|")
    for n in sizes:
        nr, lr = out["rss"][n]
        print(f"| {n} | {nr:.1f} | {lr:.1f} | {out['define_s'][n]:.2f} |")


@contextlib.asynccontextmanager
async def real_libvirtd(events: bool = False) -> AsyncIterator[Any]:
    """A connection to real libvirtd (qemu:///system), under /tmp/neurond-libvirtd.lock.

    Starts virtlogd/libvirtd only if they are not running (and stops only those); at the end
    destroys and undefines every bench-* domain, also on failure. ``events``: this process
    hears libvirt's domain events too (libvirtaio on the running loop).
    """
    import fcntl

    import libvirt
    import libvirtaio

    sys.path.insert(0, str(ROOT / "bench" / "helpers"))
    import libvirtd_define as ld

    libvirt.registerErrorHandler(lambda *a: None, None)
    if events:
        libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
    lock = open("/tmp/neurond-libvirtd.lock", "w")  # held until the end
    fcntl.flock(lock, fcntl.LOCK_EX)
    started = []
    for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
        if not ld.alive(pidfile):
            subprocess.run([daemon, "-d"], check=True, timeout=30)
            started.append(pidfile)
    conn = None
    try:
        for _ in range(100):
            try:
                conn = libvirt.open("qemu:///system")
                break
            except libvirt.libvirtError:
                await asyncio.sleep(0.1)
        assert conn is not None, "libvirtd does not answer"
        yield conn
    finally:
        if conn is not None:
            for d in conn.listAllDomains():
                if d.name().startswith(ld.PREFIX):
                    if d.isActive():
                        d.destroy()
                    d.undefine()
            conn.close()
        for pidfile in reversed(started):
            os.kill(int(Path(pidfile).read_text().strip()), signal.SIGTERM)
            for _ in range(100):  # gone before the lock goes (the next user starts its own)
                if not ld.alive(pidfile):
                    break
                await asyncio.sleep(0.1)
        lock.close()


async def bench_list_libvirtd(bus: PrivateBus, c: MessageBus, sizes: list[int], runs: int,
                              out: dict[str, Any]) -> None:  # fmt: skip
    """The VM list on real libvirtd (qemu:///system), both daemons reading the same domains.

    Defines shut-off bench-NNNN domains (a running QEMU per domain is not affordable at
    1,000); real_libvirtd() undefines them.
    """
    sys.path.insert(0, str(ROOT / "bench" / "helpers"))
    import libvirtd_define as ld

    async with real_libvirtd() as conn:
        L_CONN[0] = "/org/libvirt/QEMU"
        try:
            print("\n### VM list on real libvirtd (qemu:///system, shut-off domains)\n")
            print(f"({load()})\n")
            print("| domains | method | median ms | vs neurond GetManagedObjects |")
            print("|---|---|---|---|")
            defined = 0
            for n in sizes:
                t = time.perf_counter()
                while defined < n:
                    conn.defineXML(ld.xml(defined))
                    defined += 1
                define_s = time.perf_counter() - t
                expected = len(conn.listAllDomains())
                lv = await start_libvirt_dbus(bus, c)
                daemon = Daemon(bus, libvirt_uri="qemu:///system").start()
                try:
                    times = await interleaved(c, runs, expected)
                    base = median(times["neurond GetManagedObjects"])
                    for name, ts in times.items():
                        print(f"| {n} | {name} | {median(ts) * 1e3:.2f} | "
                              f"{median(ts) / base:.1f}x |")  # fmt: skip
                    medians = {k: median(v) for k, v in times.items()}
                    out.setdefault("libvirtd_list", {})[n] = medians
                    out.setdefault("libvirtd_define_s", {})[n] = define_s
                    out.setdefault("libvirtd_rss", {})[n] = (rss_mib(daemon.pid), rss_mib(lv.pid))
                finally:
                    daemon.close()
                    lv.stop()
            print("\n| domains | neurond RSS MiB | libvirt-dbus RSS MiB "
                  "| defineXML of the added, s |")  # fmt: skip
            print("|---|---|---|---|")
            for n in sizes:
                nr, lr = out["libvirtd_rss"][n]
                print(f"| {n} | {nr:.1f} | {lr:.1f} | {out['libvirtd_define_s'][n]:.2f} |")
        finally:
            L_CONN[0] = L_TEST


GUEST_DIR = Path("/var/cache/neurond-tests/guest")  # TESTING.md's tiny guest
GUEST_UUID = "62656e63-6800-4000-8000-6775657374aa"


def guest_xml() -> str:
    """The tiny guest (TESTING.md): q35, type qemu, 256 MiB, direct kernel boot, no disk."""
    return (f"<domain type='qemu'><name>bench-guest</name><uuid>{GUEST_UUID}</uuid>"
            "<memory unit='MiB'>256</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='q35'>hvm</type>"
            f"<kernel>{GUEST_DIR / 'vmlinuz'}</kernel><initrd>{GUEST_DIR / 'initrd-plain.img'}"
            "</initrd><cmdline>console=ttyS0 quiet</cmdline></os><features><acpi/></features>"
            "<on_poweroff>destroy</on_poweroff><devices><memballoon model='none'/></devices>"
            "</domain>")  # fmt: skip


async def bench_virsh_events(bus: PrivateBus, c: MessageBus, runs: int, pairs: int,
                             out: dict[str, Any]) -> None:  # fmt: skip
    """`virsh suspend`/`resume` of a running tiny guest on real libvirtd; every change is seen
    by three observers at once: this process's own libvirt connection (the event as libvirtd
    sends it: the reference), neurond's PropertiesChanged and libvirt-dbus's DomainEvent."""
    import libvirt

    path = f"{N_ROOT}/vm/{GUEST_UUID.replace('-', '_')}"
    async with real_libvirtd(events=True) as conn:
        dom = conn.defineXML(guest_xml())
        dom.create()
        seen: dict[str, float] = {}

        def on_libvirt(_c: Any, d: Any, event: int, _detail: int, _o: Any) -> None:
            if d.UUIDString() == GUEST_UUID and event in (libvirt.VIR_DOMAIN_EVENT_SUSPENDED,
                                                          libvirt.VIR_DOMAIN_EVENT_RESUMED):
                seen.setdefault("libvirt", time.perf_counter())  # fmt: skip

        cb = conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_libvirt,
                                         None)  # fmt: skip
        lv = await start_libvirt_dbus(bus, c)
        # libvirt-dbus opens qemu:///system (and registers for its events) on first use.
        await call(c, L_NAME, "/org/libvirt/QEMU", PROPS, "Get", "ss", [L_CONNECT, "Version"])
        daemon = Daemon(bus, libvirt_uri="qemu:///system").start()
        sc = await MessageBus(bus_address=bus.address).connect()

        def on_signal(m: Message) -> bool:
            if m.message_type is not MessageType.SIGNAL:
                return False
            if m.member == "PropertiesChanged" and m.path == path and "State" in m.body[1]:
                if m.body[1]["State"].value in ("paused", "running"):
                    seen.setdefault("neurond", time.perf_counter())
            elif m.member == "DomainEvent" and m.body[1] in (L_SUSPENDED, L_RESUMED):
                seen.setdefault("libvirt-dbus", time.perf_counter())
            return False

        sc.add_message_handler(on_signal)
        await add_match(sc, f"type='signal',sender='{N_NAME}',path='{path}',interface='{PROPS}'")
        await add_match(sc, f"type='signal',sender='{L_NAME}',interface='{L_CONNECT}',"
                            "member='DomainEvent'")  # fmt: skip
        names = ("virsh returns", "neurond PropertiesChanged", "libvirt-dbus DomainEvent")
        lat: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in names}
        try:
            for _ in range(runs):
                samples: dict[str, list[float]] = {k: [] for k in names}
                for i in range(2 * pairs):
                    seen.clear()
                    proc = await asyncio.create_subprocess_exec(
                        "virsh", "-q", "-c", "qemu:///system",
                        "suspend" if i % 2 == 0 else "resume", "bench-guest",
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                    if await proc.wait() != 0:
                        raise RuntimeError("virsh failed")
                    done = time.perf_counter()
                    deadline = done + 5
                    while len(seen) < 3 and time.perf_counter() < deadline:
                        await asyncio.sleep(0.0005)
                    if len(seen) < 3:
                        raise RuntimeError(f"signals missing: saw only {sorted(seen)}")
                    ref = seen["libvirt"]
                    samples["virsh returns"].append(done - ref)
                    samples["neurond PropertiesChanged"].append(seen["neurond"] - ref)
                    samples["libvirt-dbus DomainEvent"].append(seen["libvirt-dbus"] - ref)
                for k in names:
                    lat[k][0].append(pct(samples[k], 50))
                    lat[k][1].append(pct(samples[k], 99))
        finally:
            sc.disconnect()
            daemon.close()
            lv.stop()
            conn.domainEventDeregisterAny(cb)
    print("\n### Event latency on real libvirtd: `virsh suspend`/`resume` of a running guest\n")
    print(f"({load()})\n")
    print("Milliseconds after this process's own libvirt connection got the event.\n")
    print("| observer | p50 | p99 | p99 vs libvirt-dbus |")
    print("|---|---|---|---|")
    lp99 = median(lat["libvirt-dbus DomainEvent"][1])
    for k, (p50s, p99s) in lat.items():
        p50, p99 = median(p50s), median(p99s)
        print(f"| {k} | {p50 * 1e3:.2f} | {p99 * 1e3:.2f} | {p99 / lp99:.2f}x |")
        out.setdefault("virsh", {})[k] = (p50, p99)


# -- 2. single calls -----------------------------------------------------------------------


async def op_neurond(c: MessageBus) -> None:
    [path] = await call(c, N_NAME, N_MANAGER_PATH, N_MANAGER, "GetVM", "s", ["test"])
    await call(c, N_NAME, path, PROPS, "Get", "ss", [N_VM, "State"])


async def op_libvirt(c: MessageBus) -> None:
    [path] = await call(c, L_NAME, L_TEST, L_CONNECT, "DomainLookupByName", "s", ["test"])
    await call(c, L_NAME, path, PROPS, "Get", "ss", [L_DOMAIN, "UUID"])


async def op_echo(c: MessageBus) -> None:
    [path] = await call(c, E_NAME, E_PATH, E_NAME, "Lookup", "s", ["test"])
    await call(c, E_NAME, path, PROPS, "Get", "ss", [E_NAME, "State"])


SINGLE_OPS = {
    "neurond GetVM + Get(State)": op_neurond,
    "libvirt-dbus DomainLookupByName + Get(UUID)": op_libvirt,
    "echo floor Lookup + Get": op_echo,
}


async def latencies(clients: list[MessageBus], op: Callable[[MessageBus], Awaitable[None]],
                    per_client: int) -> list[float]:  # fmt: skip
    samples: list[float] = []

    async def loop(c: MessageBus) -> None:
        for _ in range(per_client):
            t = time.perf_counter()
            await op(c)
            samples.append(time.perf_counter() - t)

    await asyncio.gather(*(loop(c) for c in clients))
    return samples


async def bench_single(bus: PrivateBus, c: MessageBus, runs: int, ops: int, concurrency: list[int],
                       out: dict[str, Any]) -> None:  # fmt: skip
    lv = await start_libvirt_dbus(bus, c)
    echo = await start_echo(bus, c)
    daemon = Daemon(bus).start()
    conns = [await MessageBus(bus_address=bus.address).connect() for _ in range(max(concurrency))]
    try:
        print("\n### Single call: lookup by name + one property Get (ms), test driver\n")
        print(f"({load()})\n")
        print("| clients | service | p50 | p99 | p50 vs echo floor |")
        print("|---|---|---|---|---|")
        for k in concurrency:
            per_client = max(2, ops // k)
            p50s: dict[str, list[float]] = {name: [] for name in SINGLE_OPS}
            p99s: dict[str, list[float]] = {name: [] for name in SINGLE_OPS}
            for op in SINGLE_OPS.values():  # warm-up
                await latencies(conns[:k], op, 2)
            for r in range(runs):
                for name in abba(list(SINGLE_OPS), r):
                    s = await latencies(conns[:k], SINGLE_OPS[name], per_client)
                    p50s[name].append(pct(s, 50))
                    p99s[name].append(pct(s, 99))
            floor = median(p50s["echo floor Lookup + Get"])
            for name in SINGLE_OPS:
                p50, p99 = median(p50s[name]), median(p99s[name])
                print(f"| {k} | {name} | {p50 * 1e3:.3f} | {p99 * 1e3:.3f} | {p50 / floor:.2f}x |")
                out.setdefault("single", {})[(k, name)] = (p50, p99)
    finally:
        for conn in conns:
            conn.disconnect()
        daemon.close()
        echo.stop()
        lv.stop()


# -- 3. lifecycle and 4. events ------------------------------------------------------------


class Signals:
    """Resolves a waiting future when a matching signal arrives; stamps the arrival time."""

    def __init__(self, c: MessageBus) -> None:
        self.waiter: tuple[Callable[[Message], bool], asyncio.Future[float]] | None = None
        c.add_message_handler(self._on)

    def _on(self, msg: Message) -> bool:
        if msg.message_type is MessageType.SIGNAL and self.waiter is not None:
            pred, fut = self.waiter
            if pred(msg) and not fut.done():
                fut.set_result(time.perf_counter())
        return False

    def expect(self, pred: Callable[[Message], bool]) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiter = (pred, fut)
        return fut


def n_state_is(state: str) -> Callable[[Message], bool]:
    def pred(m: Message) -> bool:
        return (m.member == "PropertiesChanged" and m.path == TEST_PATH
                and m.body[0] == N_VM and "State" in m.body[1]
                and m.body[1]["State"].value == state)  # fmt: skip

    return pred


def l_event_is(event: int) -> Callable[[Message], bool]:
    return lambda m: m.member == "DomainEvent" and m.body[1] == event


L_SUSPENDED, L_RESUMED = 3, 4


async def add_match(c: MessageBus, rule: str) -> None:
    await call(c, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
               "AddMatch", "s", [rule])  # fmt: skip


async def bench_lifecycle_events(bus: PrivateBus, c: MessageBus, runs: int, pairs: int,
                                 do_life: bool, do_events: bool,
                                 out: dict[str, Any]) -> None:  # fmt: skip
    lv = await start_libvirt_dbus(bus, c)
    echo = await start_echo(bus, c)
    daemon = Daemon(bus).start()
    sc = await MessageBus(bus_address=bus.address).connect()
    sig = Signals(sc)
    await add_match(sc, f"type='signal',sender='{N_NAME}',path='{TEST_PATH}',interface='{PROPS}'")
    await add_match(
        sc, f"type='signal',sender='{L_NAME}',interface='{L_CONNECT}',member='DomainEvent'"
    )
    [lpath] = await call(c, L_NAME, L_TEST, L_CONNECT, "DomainLookupByName", "s", ["test"])

    async def n_pair(cl: MessageBus) -> None:
        await call(cl, N_NAME, TEST_PATH, N_VM, "Pause")
        await call(cl, N_NAME, TEST_PATH, N_VM, "Resume")

    async def l_pair(cl: MessageBus) -> None:
        await call(cl, L_NAME, lpath, L_DOMAIN, "Suspend")
        await call(cl, L_NAME, lpath, L_DOMAIN, "Resume")

    async def e_pair(cl: MessageBus) -> None:
        await call(cl, E_NAME, E_PATH, E_NAME, "Echo", "s", ["pause"])
        await call(cl, E_NAME, E_PATH, E_NAME, "Echo", "s", ["resume"])

    try:
        if do_life:
            pair_ops = {"neurond Pause + Resume": n_pair,
                        "libvirt-dbus Suspend + Resume": l_pair,
                        "echo floor 2 x Echo": e_pair}  # fmt: skip
            rates: dict[str, list[float]] = {k: [] for k in pair_ops}
            for r in range(runs):
                for name in abba(list(pair_ops), r):
                    t = time.perf_counter()
                    for _ in range(pairs):
                        await pair_ops[name](c)
                    rates[name].append(pairs / (time.perf_counter() - t))
            print("\n### Lifecycle: Pause/Resume round trips, one client, test driver\n")
            print(f"({load()})\n")
            print("| service | pairs/s (median) | vs libvirt-dbus |")
            print("|---|---|---|")
            lbase = median(rates["libvirt-dbus Suspend + Resume"])
            for name, rs in rates.items():
                print(f"| {name} | {median(rs):.0f} | {median(rs) / lbase:.2f}x |")
                out.setdefault("lifecycle", {})[name] = median(rs)
        if do_events:
            lat: dict[str, tuple[list[float], list[float]]] = {
                "neurond Pause → PropertiesChanged": ([], []),
                "libvirt-dbus Suspend → DomainEvent": ([], []),
            }
            for r in range(runs):
                for name in abba(list(lat), r):
                    samples = []
                    for _ in range(pairs):
                        if name.startswith("neurond"):
                            fut = sig.expect(n_state_is("paused"))
                            t = time.perf_counter()
                            await call(c, N_NAME, TEST_PATH, N_VM, "Pause")
                            samples.append(await asyncio.wait_for(fut, 5) - t)
                            fut = sig.expect(n_state_is("running"))
                            await call(c, N_NAME, TEST_PATH, N_VM, "Resume")
                            await asyncio.wait_for(fut, 5)
                        else:
                            fut = sig.expect(l_event_is(L_SUSPENDED))
                            t = time.perf_counter()
                            await call(c, L_NAME, lpath, L_DOMAIN, "Suspend")
                            samples.append(await asyncio.wait_for(fut, 5) - t)
                            fut = sig.expect(l_event_is(L_RESUMED))
                            await call(c, L_NAME, lpath, L_DOMAIN, "Resume")
                            await asyncio.wait_for(fut, 5)
                    lat[name][0].append(pct(samples, 50))
                    lat[name][1].append(pct(samples, 99))
            print("\n### Event latency: call sent → signal received (ms), test driver\n")
            print(f"({load()})\n")
            print("| path | p50 | p99 | p99 vs libvirt-dbus |")
            print("|---|---|---|---|")
            lp99 = median(lat["libvirt-dbus Suspend → DomainEvent"][1])
            for name, (p50s, p99s) in lat.items():
                p50, p99 = median(p50s), median(p99s)
                print(f"| {name} | {p50 * 1e3:.3f} | {p99 * 1e3:.3f} | {p99 / lp99:.2f}x |")
                out.setdefault("events", {})[name] = (p50, p99)
    finally:
        sc.disconnect()
        daemon.close()
        echo.stop()
        lv.stop()


# -- 5. cost -------------------------------------------------------------------------------


async def bench_cost(bus: PrivateBus, c: MessageBus, runs: int, calls: int,
                     out: dict[str, Any]) -> None:  # fmt: skip
    startup, idle = [], []
    for _ in range(runs):
        d = Daemon(bus)
        t = time.perf_counter()
        d.start()
        startup.append(time.perf_counter() - t)
        await asyncio.sleep(0.2)
        idle.append(rss_mib(d.pid))
        d.close()
    imports = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import neurond.daemon"], cwd=ROOT, check=True)
        imports.append(time.perf_counter() - t)
    bare = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], cwd=ROOT, check=True)
        bare.append(time.perf_counter() - t)

    lv = await start_libvirt_dbus(bus, c)
    echo = await start_echo(bus, c)
    daemon = Daemon(bus).start()
    [lpath] = await call(c, L_NAME, L_TEST, L_CONNECT, "DomainLookupByName", "s", ["test"])
    targets = {
        "neurond": (daemon.pid, (N_NAME, TEST_PATH, N_VM, "State")),
        "libvirt-dbus": (lv.pid, (L_NAME, lpath, L_DOMAIN, "UUID")),
        "echo floor": (echo.pid, (E_NAME, E_PATH, E_NAME, "State")),
    }
    cpu: dict[str, list[float]] = {k: [] for k in targets}
    try:
        for r in range(runs):
            for name in abba(list(targets), r):
                pid, (dest, path, iface, prop) = targets[name]
                before = cpu_s(pid)
                for i in range(0, calls, 50):
                    await asyncio.gather(*(call(c, dest, path, PROPS, "Get", "ss", [iface, prop])
                                           for _ in range(min(50, calls - i))))  # fmt: skip
                cpu[name].append(cpu_s(pid) - before)
    finally:
        daemon.close()
        echo.stop()
        lv.stop()
    print("\n### Cost (medians)\n")
    print(f"({load()})\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| neurond start-up to READY=1 (test:///default) | {median(startup) * 1e3:.0f} ms |")
    print(f"| neurond idle RSS (test:///default, 1 VM) | {median(idle):.1f} MiB |")
    print(f"| `python -c 'import neurond.daemon'` wall | {median(imports) * 1e3:.0f} ms "
          f"(bare interpreter {median(bare) * 1e3:.0f} ms) |")  # fmt: skip
    for name, ts in cpu.items():
        print(f"| {name} CPU for {calls} property Gets (50 in flight) | {median(ts):.2f} s |")
    out["cost"] = {"startup": median(startup), "idle_rss": median(idle),
                   "import": median(imports), "bare": median(bare),
                   "cpu": {k: median(v) for k, v in cpu.items()}}  # fmt: skip


# -- main ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    only = set(args.only.split(",")) if args.only else set(ALL_SECTIONS)
    out: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="neurond-bench-"))
    with PrivateBus(include_system_policies=True, extra_config=ECHO_POLICY) as bus:
        c = await MessageBus(bus_address=bus.address).connect()
        try:
            if "list" in only:
                await bench_list(bus, c, sizes, args.runs, work, out)
            if "libvirtd" in only:
                await bench_list_libvirtd(bus, c, sizes, args.runs, out)
            if "virsh" in only:
                await bench_virsh_events(bus, c, args.runs, args.virsh_pairs, out)
            if "single" in only:
                conc = [int(x) for x in args.clients.split(",")]
                await bench_single(bus, c, args.runs, args.ops, conc, out)
            if "lifecycle" in only or "events" in only:
                life, events = "lifecycle" in only, "events" in only
                await bench_lifecycle_events(bus, c, args.runs, args.pairs, life, events, out)
            if "cost" in only:
                await bench_cost(bus, c, args.runs, args.calls, out)
        finally:
            c.disconnect()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--sizes", default="10,100,1000", help="domain counts for the VM list")
    p.add_argument("--runs", type=int, default=5, help="rounds; figures are medians")
    p.add_argument("--ops", type=int, default=1000, help="single-call samples per round")
    p.add_argument("--clients", default="1,50", help="concurrent client connections")
    p.add_argument("--pairs", type=int, default=200, help="pause/resume pairs per round")
    p.add_argument("--virsh-pairs", type=int, default=20,
                   help="virsh suspend/resume pairs per round (real libvirtd)")
    p.add_argument("--calls", type=int, default=10000, help="calls for the CPU-time figure")
    p.add_argument("--only", default="", help=f"comma list of {','.join(ALL_SECTIONS)}")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench/compare.py runs libvirt-dbus --system: run it as root")
    print(f"`{' '.join(['bench/compare.py', *(argv if argv is not None else sys.argv[1:])])}` "
          f"on {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"{time.strftime('%Y-%m-%d')}")  # fmt: skip
    return asyncio.run(run(args))


if __name__ == "__main__":
    main()
