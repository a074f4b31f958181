"""The neurond process: command line, wiring of the layers, sd_notify and signals."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from typing import Any

from dbus_fast import BusType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError

from neurond import __version__, config, faults, log
from neurond.bus import writer
from neurond.bus.auth import Authorizer
from neurond.bus.router import Router
from neurond.bus.service import BusService
from neurond.core.features import FeatureRegistry
from neurond.core.jobs import JobManager
from neurond.core.service import VMService
from neurond.downloads import DownloadManager
from neurond.errors import NeuronError
from neurond.hardware import HardwareReader
from neurond.virt.backend import LibvirtBackend, register_event_loop
from neurond.virt.create import make_creator
from neurond.virt.features import host_features, libvirt_features

BUS_NAME = "org.neuronos.Neuron1"
EX_CONFIG = 78  # sysexits.h: configuration error
_log = logging.getLogger("neurond.daemon")


def notify(*lines: str) -> None:
    """sd_notify; a no-op outside systemd (no NOTIFY_SOCKET)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    import systemd.daemon as sd

    sd.notify("\n".join(lines))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="neurond", description="The NeuronOS VM daemon (D-Bus).")
    p.add_argument(
        "--config", help=f"configuration file (default: $NEUROND_CONFIG or {config.DEFAULT_PATH})"
    )
    p.add_argument("--libvirt-uri", help="libvirt connection URI, e.g. qemu:///system")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--system",
        dest="session",
        action="store_false",
        default=False,
        help="serve on the system bus (default)",
    )
    group.add_argument(
        "--session",
        dest="session",
        action="store_true",
        help="serve on the session bus (development)",
    )
    p.add_argument("--log-target", choices=["auto", "journal", "console", "json"])
    p.add_argument("--test-hooks", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--version", action="version", version=f"neurond {__version__}")
    return p.parse_args(argv)


class Daemon:
    """Owns the bus connection, the libvirt backend and the core for the process's life."""

    def __init__(self, args: argparse.Namespace, cfg: config.Config) -> None:
        self.args = args
        self.cfg = cfg
        self.stop_requested = asyncio.Event()
        self.core: VMService | None = None

    def _overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.args.libvirt_uri:
            out["libvirt_uri"] = self.args.libvirt_uri
        return out

    # EventSink for the backend: forwarded to the core once it exists.
    def domain_event(self, uuid: str) -> None:
        if self.core is not None:
            self.core.domain_event(uuid)

    def connection_changed(self, connected: bool) -> None:
        if self.core is not None:
            self.core.connection_changed(connected)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        register_event_loop()
        bus_type = BusType.SESSION if self.args.session else BusType.SYSTEM
        try:
            bus = await MessageBus(bus_type=bus_type).connect()
        except (OSError, DBusError, ValueError) as e:
            _log.error("Cannot connect to the %s bus: %s", bus_type.name.lower(), e)
            return 1
        writer.install(bus)
        router = Router(bus, self.cfg.timeouts.call_s, self.cfg.limits.calls_per_sender)
        auth = Authorizer(
            bus, self.args.session, self.cfg.authorization.polkit, self.cfg.timeouts.call_s / 2
        )
        await auth.start()
        router.caller_uid = auth.uid
        hardware = HardwareReader(self.cfg.hardware.sysfs_root, self.cfg.hardware.procfs_root)
        svc = BusService(router, auth, self.cfg, hardware)
        jobs = JobManager(svc, self.cfg.jobs.linger_s)
        backend = LibvirtBackend(self.cfg.libvirt_uri, self)
        self.core = core = VMService(backend, svc, jobs)
        svc.attach(core, jobs)
        svc.downloads = DownloadManager(jobs, self.cfg.downloads.max_parallel)
        features = FeatureRegistry([*libvirt_features(backend), *host_features()])
        svc.features = features
        svc.creator = creator = make_creator(core, backend, lambda: self.cfg)

        first_sync = asyncio.Event()

        async def on_connected() -> None:
            await creator.recover()  # creates a killed neurond left half done (first time only)
            try:
                await core.sync()
            except NeuronError as e:
                log.log_error(_log, e, f"Could not read the domain list: {e.message}")
            core.connection_changed(True)
            if await features.refresh():  # what QEMU offers may differ after a reconnect
                svc.features_changed()
            first_sync.set()

        backend_task = asyncio.create_task(backend.run(on_connected))
        # Serve a complete VM list from the first call, but never wait long for libvirt.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(first_sync.wait(), self.cfg.timeouts.call_s)

        try:
            reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except DBusError as e:
            _log.error("The bus refused the name %s: %s", BUS_NAME, e.text)
            reply = None
        if reply is not RequestNameReply.PRIMARY_OWNER:
            _log.error("Cannot own %s (%s); is another neurond running?", BUS_NAME, reply)
            await backend.close()
            backend_task.cancel()
            bus.disconnect()
            return 1

        router.live = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._reload(svc))
        watchdog = asyncio.create_task(self._watchdog())
        notify("READY=1", f"STATUS=Serving {len(core.vms)} VMs from {backend.uri}")
        _log.info(
            "neurond %s ready on the %s bus with %d VMs",
            __version__,
            "session" if self.args.session else "system",
            len(core.vms),
        )

        disconnected = asyncio.ensure_future(bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        await asyncio.wait(
            [disconnected, asyncio.ensure_future(self.stop_requested.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if disconnected.done():
            _log.error("The bus connection was lost; exiting so that systemd restarts neurond")
            return 1

        notify("STOPPING=1", "STATUS=Stopping")
        _log.info("Stopping: finishing calls in flight (at most %g s)", self.cfg.timeouts.stop_s)
        await router.drain(self.cfg.timeouts.stop_s)
        await jobs.shutdown(self.cfg.timeouts.stop_s / 2)
        with contextlib.suppress(DBusError, OSError):
            await asyncio.wait_for(bus.release_name(BUS_NAME), 2)
        watchdog.cancel()
        await backend.close()
        backend_task.cancel()
        bus.disconnect()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await asyncio.wait_for(disconnected, 2)
        _log.info("neurond stopped")
        return 0

    async def _watchdog(self) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if usec <= 0:
            return
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(usec / 2e6)

    def _reload(self, svc: BusService) -> None:
        notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = config.load(config.config_path(self.args.config), self._overrides())
            log.setup(self.args.log_target or new.logging.target, new.logging.level)
        except NeuronError as e:
            log.log_error(_log, e, f"Reload failed, keeping the old configuration: {e.message}")
            notify("READY=1", "STATUS=Reload failed; the old configuration stays")
            return
        if new.libvirt_uri != self.cfg.libvirt_uri:
            _log.warning("libvirt_uri changed; it takes effect when neurond restarts")
        self.cfg = new
        svc.set_config(new)
        notify("READY=1", "STATUS=Configuration reloaded")
        _log.info("Configuration reloaded")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = config.config_path(args.config)
        overrides = {"libvirt_uri": args.libvirt_uri} if args.libvirt_uri else {}
        cfg = config.load(path, overrides, must_exist=bool(args.config))
        log.setup(args.log_target or cfg.logging.target, cfg.logging.level)
        if args.test_hooks:
            faults.configure(os.environ.get("NEUROND_FAULTS", ""))
    except NeuronError as e:
        print(f"neurond: {e.message}", file=sys.stderr)
        return EX_CONFIG
    if args.test_hooks:
        _log.warning("Test hooks enabled: faults %s", sorted(faults.active()) or "none")
    code = asyncio.run(Daemon(args, cfg).run())
    # A libvirt call stuck in a worker thread must not hold the exit: the executor's threads
    # are joined at interpreter exit, so leave without that once everything is closed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
