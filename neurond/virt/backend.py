"""The libvirt backend: one shared connection, blocking calls in a bounded executor, events.

The only part of neurond that imports libvirt. The connection owner (``run``) opens the
connection, registers event callbacks, notices its loss (close callback and keepalive) and
reconnects with capped exponential backoff; the core is told through its EventSink.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import libvirt
import libvirtaio

from neurond import faults, log, messages
from neurond.core.backend import DomainInfo, EventSink
from neurond.core.guest import Display, ExecRequest, ExecResult, GuestInfo
from neurond.core.states import from_libvirt
from neurond.domain.parse import summarize
from neurond.errors import (
    LibvirtConnectionFailedError,
    NeuronError,
    NotSupportedError,
    OperationFailedError,
    VMNotFoundError,
    VMStartFailedError,
    VMStopFailedError,
)
from neurond.virt import display, media
from neurond.virt.errors import translate
from neurond.virt.guest import GuestAgent

_log = logging.getLogger("neurond.virt")
T = TypeVar("T")

KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 3
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0

_event_impl_registered = False


def register_event_loop() -> None:
    """Bind libvirt's event loop to asyncio's; once per process, before any connection."""
    global _event_impl_registered
    if not _event_impl_registered:
        libvirt.registerErrorHandler(lambda *_: None, None)  # errors are raised, not printed
        libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
        _event_impl_registered = True


_NOT_REFUSALS = (
    libvirt.VIR_ERR_NO_DOMAIN,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
)


def _live(uuid: str, what: str, change: Callable[[], object]) -> None:
    """A change to the running VM (balloon, vCPU hot-plug); the hypervisor's refusal is
    NotSupported with its reason."""
    try:
        change()
    except libvirt.libvirtError as e:
        if e.get_error_code() in _NOT_REFUSALS:
            raise  # translated as any other call's error
        raise NotSupportedError(
            f"The hypervisor cannot change the {what} of the running VM: "
            f"{e.get_error_message()}. Nothing was changed; without option live the change "
            "applies at the next boot.",
            details={"uuid": uuid, "live": True},
        ) from None


class LibvirtBackend:
    """Implements neurond.core.backend.Backend on libvirt-python."""

    def __init__(self, uri: str, sink: EventSink, workers: int = 4) -> None:
        self._uri = uri
        self._sink = sink
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="libvirt")
        # Guest agent commands wait up to timeouts.guest_agent_s each: their own threads, so
        # unresponsive agents cannot hold up lifecycle calls.
        self._agent_executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="libvirt-agent"
        )
        self._conn: libvirt.virConnect | None = None
        self._callbacks: list[int] = []
        self._lost = asyncio.Event()
        self._stopping = False

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def connected(self) -> bool:
        return self._conn is not None

    # ---- connection owner ---------------------------------------------------------------

    async def run(self, on_connected: Callable[[], Any]) -> None:
        """Keep the connection up until ``close``; ``on_connected`` runs after every (re)open."""
        delay = BACKOFF_FIRST_S
        while not self._stopping:
            try:
                await self._open()
            except NeuronError as e:
                log.log_error(
                    _log, e, f"Cannot connect to libvirt at {self._uri}; retrying in {delay:.1f} s"
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), delay)
                self._lost.clear()
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            delay = BACKOFF_FIRST_S
            _log.info(
                "Connected to libvirt at %s",
                self._uri,
                extra={
                    "fields": {
                        "NEUROND_LIBVIRT_URI": self._uri,
                        "MESSAGE_ID": messages.LIBVIRT_RESTORED,
                    }
                },
            )
            await on_connected()
            await self._lost.wait()
            self._lost.clear()
            if not self._stopping:
                _log.warning(
                    "Lost the connection to libvirt at %s",
                    self._uri,
                    extra={
                        "fields": {
                            "NEUROND_LIBVIRT_URI": self._uri,
                            "MESSAGE_ID": messages.LIBVIRT_LOST,
                        }
                    },
                )
                await self._drop()
                self._sink.connection_changed(False)

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()

        def open_() -> libvirt.virConnect:
            faults.hit("virt.open")
            return libvirt.open(self._uri)

        try:
            conn = await loop.run_in_executor(self._executor, open_)
        except libvirt.libvirtError as e:
            raise LibvirtConnectionFailedError(
                f"Cannot connect to libvirt at {self._uri}: {e.get_error_message()}.",
                details={"uri": self._uri},
                cause=e,
            ) from None
        try:
            # Keepalive notices a dead libvirtd even when idle; local drivers do not support it.
            with contextlib.suppress(libvirt.libvirtError):
                conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
            conn.registerCloseCallback(self._on_close, None)
            self._callbacks = [
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                ),
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, self._on_lifecycle, None
                ),
            ]
        except libvirt.libvirtError as e:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            raise LibvirtConnectionFailedError(
                f"Cannot register for libvirt events at {self._uri}: {e.get_error_message()}.",
                details={"uri": self._uri},
                cause=e,
            ) from None
        self._conn = conn

    def _on_lifecycle(self, _conn: Any, dom: libvirt.virDomain, *_args: Any) -> None:
        self._sink.domain_event(dom.UUIDString())

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        self._lost.set()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return

        def close() -> None:
            for cb in self._callbacks:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(cb)
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

        self._callbacks = []
        await asyncio.get_running_loop().run_in_executor(self._executor, close)

    async def close(self) -> None:
        self._stopping = True
        self._lost.set()
        await self._drop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._agent_executor.shutdown(wait=False, cancel_futures=True)

    # ---- calls --------------------------------------------------------------------------

    async def _call(
        self,
        point: str,
        fallback: type[NeuronError],
        doing: str,
        vm: str,
        fn: Callable[[libvirt.virConnect], T],
        executor: ThreadPoolExecutor | None = None,
    ) -> T:
        conn = self._conn
        if conn is None:
            raise LibvirtConnectionFailedError(
                f"Could not {doing}: neurond is not connected to libvirt ({self._uri}).",
                details={"uri": self._uri},
            )

        def run() -> T:
            fault = faults.hit(point)
            if fault is not None:
                raise libvirt.libvirtError(f"injected libvirt fault at {point}")
            return fn(conn)

        try:
            # copy_context: log fields bound by the caller (vm, sender) follow into the thread
            return await asyncio.get_running_loop().run_in_executor(
                executor or self._executor, contextvars.copy_context().run, run
            )
        except libvirt.libvirtError as e:
            err = translate(e, fallback, doing, vm)
            if isinstance(err, LibvirtConnectionFailedError):
                self._lost.set()
            raise err from None

    def _info(self, dom: libvirt.virDomain) -> DomainInfo:
        summary = summarize(dom.XMLDesc(0))
        state, reason = dom.state()
        ours, reason_name = from_libvirt(state, reason)
        return DomainInfo(
            uuid=summary.uuid,
            name=summary.name,
            state=ours,
            reason=reason_name,
            persistent=bool(dom.isPersistent()),
            autostart=bool(dom.autostart()),
            vcpus=summary.vcpus,
            memory_mib=summary.memory_mib,
            gpu_address=summary.gpu_address,
            looking_glass=summary.looking_glass,
            guest_agent=summary.guest_agent,
            owner=summary.owner,
            profile=summary.profile,
            media=summary.media,
        )

    async def list_domains(self) -> list[DomainInfo]:
        def list_(conn: libvirt.virConnect) -> list[DomainInfo]:
            out = []
            for dom in conn.listAllDomains(0):
                try:
                    out.append(self._info(dom))
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise  # a domain undefined while we list it is simply gone
            return out

        return await self._call("virt.list", OperationFailedError, "list the domains", "", list_)

    async def get_domain(self, uuid: str) -> DomainInfo | None:
        def get(conn: libvirt.virConnect) -> DomainInfo | None:
            try:
                return self._info(conn.lookupByUUIDString(uuid))
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise

        return await self._call("virt.get", OperationFailedError, "read domain", uuid, get)

    async def _on_domain(
        self,
        point: str,
        fallback: type[NeuronError],
        doing: str,
        uuid: str,
        fn: Callable[[libvirt.virDomain], object],
    ) -> None:
        def act(conn: libvirt.virConnect) -> None:
            fn(conn.lookupByUUIDString(uuid))

        try:
            await self._call(point, fallback, doing, uuid, act)
        except VMNotFoundError:
            raise VMNotFoundError(
                f"Could not {doing}: the VM {uuid} no longer exists.", details={"uuid": uuid}
            ) from None

    async def _act(
        self,
        point: str,
        fallback: type[NeuronError],
        doing: str,
        uuid: str,
        fn: Callable[[libvirt.virDomain], object],
    ) -> DomainInfo | None:
        """``fn`` on the domain, then the domain read in the same executor job (a transition
        applies it without a second trip to the worker thread); None when that read fails
        or the domain is gone: the core then reads it again."""
        fresh: list[DomainInfo] = []

        def act(d: libvirt.virDomain) -> None:
            fn(d)
            with contextlib.suppress(libvirt.libvirtError):
                fresh.append(self._info(d))

        await self._on_domain(point, fallback, doing, uuid, act)
        return fresh[0] if fresh else None

    async def start(self, uuid: str, paused: bool) -> DomainInfo | None:
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        return await self._act(
            "virt.start", VMStartFailedError, "start", uuid, lambda d: d.createWithFlags(flags)
        )

    async def shutdown(self, uuid: str) -> None:
        await self._on_domain(
            "virt.shutdown",
            VMStopFailedError,
            "shut down",
            uuid,
            lambda d: (
                d.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                if self._uri.startswith("qemu")
                else d.shutdown()
            ),
        )

    async def destroy(self, uuid: str) -> DomainInfo | None:
        return await self._act(
            "virt.destroy", VMStopFailedError, "force off", uuid, lambda d: d.destroy()
        )

    async def suspend(self, uuid: str) -> DomainInfo | None:
        return await self._act(
            "virt.suspend", OperationFailedError, "pause", uuid, lambda d: d.suspend()
        )

    async def resume(self, uuid: str) -> DomainInfo | None:
        return await self._act(
            "virt.resume", OperationFailedError, "resume", uuid, lambda d: d.resume()
        )

    async def reboot(self, uuid: str) -> DomainInfo | None:
        return await self._act(
            "virt.reboot", OperationFailedError, "reboot", uuid, lambda d: d.reboot(0)
        )

    async def reset(self, uuid: str) -> DomainInfo | None:
        return await self._act(
            "virt.reset", OperationFailedError, "reset", uuid, lambda d: d.reset(0)
        )

    async def set_autostart(self, uuid: str, enabled: bool) -> None:
        await self._on_domain(
            "virt.set_autostart",
            OperationFailedError,
            "set autostart of",
            uuid,
            lambda d: d.setAutostart(1 if enabled else 0),
        )

    # ---- changes after creation (issue 12) ------------------------------------------------

    async def rename(self, uuid: str, new_name: str) -> DomainInfo | None:
        return await self._act(
            "virt.rename", OperationFailedError, "rename", uuid, lambda d: d.rename(new_name, 0)
        )

    async def host_limits(self) -> tuple[int, int]:
        info = await self._call(
            "virt.host", OperationFailedError, "read the host's memory and CPUs", "",
            lambda conn: conn.getInfo(),
        )  # fmt: skip
        return int(info[1]), int(info[2])

    async def set_memory(self, uuid: str, mib: int, live: bool) -> DomainInfo | None:
        kib = mib * 1024
        config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        maximum = libvirt.VIR_DOMAIN_MEM_MAXIMUM

        def set_(d: libvirt.virDomain) -> None:
            if live and d.isActive():  # first: a refused live change changes nothing
                _live(uuid, "memory", lambda: d.setMemoryFlags(kib, libvirt.VIR_DOMAIN_AFFECT_LIVE))
            # The persistent definition: maximum and current both become ``mib`` (a lower
            # maximum also lowers the current memory, so the maximum goes first).
            d.setMemoryFlags(kib, config | maximum)
            d.setMemoryFlags(kib, config)

        return await self._act(
            "virt.set_memory", OperationFailedError, "set the memory of", uuid, set_
        )

    async def set_vcpus(self, uuid: str, count: int, live: bool) -> DomainInfo | None:
        config = libvirt.VIR_DOMAIN_AFFECT_CONFIG

        def set_(d: libvirt.virDomain) -> None:
            if live and d.isActive():  # first: a refused live change changes nothing
                _live(uuid, "vCPUs", lambda: d.setVcpusFlags(count, libvirt.VIR_DOMAIN_AFFECT_LIVE))
            # The persistent definition: maximum and current both become ``count`` (VCPUs shows
            # the maximum); current never above maximum, so the order depends on the direction.
            maximum = config | libvirt.VIR_DOMAIN_VCPU_MAXIMUM
            if count >= d.vcpusFlags(maximum):
                d.setVcpusFlags(count, maximum)
                d.setVcpusFlags(count, config)
            else:
                d.setVcpusFlags(count, config)
                d.setVcpusFlags(count, maximum)

        return await self._act(
            "virt.set_vcpus", OperationFailedError, "set the vCPUs of", uuid, set_
        )

    async def change_media(self, uuid: str, path: str | None) -> DomainInfo | None:
        doing = "change the CD-ROM media of" if path is not None else "eject the CD-ROM of"
        return await self._act(
            "virt.change_media", OperationFailedError, doing, uuid,
            lambda d: media.change(d, path),
        )  # fmt: skip

    async def domain_files(self) -> dict[str, frozenset[str]]:
        return await self._call(
            "virt.domain_files", OperationFailedError, "list the files of the domains", "",
            media.domain_files,
        )  # fmt: skip

    # ---- guest agent, display, capabilities ---------------------------------------------

    def _agent(self, uuid: str, timeout_s: float) -> GuestAgent:
        async def run(point: str, doing: str, fn: Callable[[libvirt.virDomain], Any]) -> Any:
            def on_domain(conn: libvirt.virConnect) -> Any:
                return fn(conn.lookupByUUIDString(uuid))

            return await self._call(
                point, OperationFailedError, doing, uuid, on_domain, self._agent_executor
            )

        return GuestAgent(run, uuid, timeout_s)

    async def guest_ping(self, uuid: str, timeout_s: float) -> None:
        await self._agent(uuid, timeout_s).ping()

    async def guest_info(self, uuid: str, timeout_s: float) -> GuestInfo:
        return await self._agent(uuid, timeout_s).info()

    async def guest_exec(self, uuid: str, request: ExecRequest, timeout_s: float) -> ExecResult:
        return await self._agent(uuid, timeout_s).exec(request)

    async def display(self, uuid: str) -> Display:
        xml = await self._call(
            "virt.display",
            OperationFailedError,
            "read the display of",
            uuid,
            lambda conn: conn.lookupByUUIDString(uuid).XMLDesc(0),
        )
        # stat() of a /dev/shm file: a thread, as every file access of the daemon
        return await asyncio.to_thread(display.choose, xml)

    async def driver_type(self) -> str:
        return await self._call(
            "virt.capabilities", OperationFailedError, "read the driver type", "",
            lambda conn: str(conn.getType()),
        )  # fmt: skip

    async def domain_capabilities(self) -> str:
        return await self._call(
            "virt.capabilities", OperationFailedError, "read the domain capabilities", "",
            lambda conn: str(conn.getDomainCapabilities(None, None, None, None, 0)),
        )  # fmt: skip
