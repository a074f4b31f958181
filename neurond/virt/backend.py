"""The libvirt backend: one shared connection, blocking calls in bounded worker threads, events.

The only part of neurond that imports libvirt. The connection owner (``run``) opens the
connection, registers event callbacks, notices its loss (close callback and keepalive) and
reconnects with capped exponential backoff; the core is told through its EventSink.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt
import libvirtaio

from neurond import faults, log, messages
from neurond.core.backend import DomainInfo, DomainState, EventSink
from neurond.core.guest import Display, ExecRequest, ExecResult, GuestInfo
from neurond.core.states import from_libvirt
from neurond.domain.parse import DomainSummary, summarize
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

# Lifecycle events that change a domain's state and nothing else of what neurond shows (a
# pause or resume: the XML, persistence and autostart stay). Not start or stop (the live XML
# replaces the persistent one, or back), nor a snapshot's or migration's pause or resume.
_STATE_ONLY_EVENTS = frozenset(
    {
        (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED),
        (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR),
        (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_WATCHDOG),
        (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_API_ERROR),
        (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED),
    }
)


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


def _within_live_maximum(uuid: str, what: str, asked: int, maximum: int, unit: str) -> None:
    """The running VM's maximum (memory for the balloon, vCPUs for hot-plug) was fixed when it
    booted: above it the change cannot be live (NotSupported naming the bound)."""
    if asked > maximum:
        raise NotSupportedError(
            f"The running VM's {what} can go up to its maximum of {maximum}{unit}, fixed when it "
            f"booted, not {asked}{unit}. Nothing was changed; without option live the change "
            "applies at the next boot.",
            details={"uuid": uuid, "live": True, "maximum": maximum},
        )


# A worker's job: the loop and future to settle, the caller's context's run, the call.
_Job = tuple[
    asyncio.AbstractEventLoop,
    "asyncio.Future[Any]",
    Callable[[Callable[[], Any]], Any],
    Callable[[], Any],
]


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if not fut.done():  # cancelled meanwhile: its caller gave up (a timeout)
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)


def _state_of(dom: libvirt.virDomain) -> DomainState:
    """The domain's state alone (one RPC)."""
    return DomainState(*from_libvirt(*dom.state()))


class _Workers:
    """Threads for blocking libvirt calls, at most ``size``, started as needed.

    What ``run_in_executor`` on a ThreadPoolExecutor does, with less on the way: a job is one
    queue entry, and its result reaches the loop with one ``call_soon_threadsafe`` (no second
    future, no done callbacks, no locks), which is most of a Pause's trip to libvirt
    (docs/benchmarks.md). Daemon threads: a call hung in a dead libvirtd does not hold up the
    process's exit (the keepalive and the callers' timeouts bound it before that)."""

    def __init__(self, size: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._size = size
        self._started = 0
        self._name = name
        self._closed = False

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """``fn()`` in a worker thread (in the caller's context: its bound log fields)."""
        if self._closed:  # as ThreadPoolExecutor.submit: nothing would ever run it
            raise RuntimeError("cannot run libvirt calls after the backend closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, fut, contextvars.copy_context().run, fn))
        if not self._idle.acquire(blocking=False) and self._started < self._size:
            name = f"{self._name}_{self._started}"
            self._started += 1
            threading.Thread(target=self._work, name=name, daemon=True).start()
        return fut

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, fut, run, fn = job
            del job
            if not fut.cancelled():  # cancelled while queued: nobody waits for it
                result, error = None, None
                try:
                    result = run(fn)
                except BaseException as e:  # noqa: BLE001 - handed to the caller, as an executor does
                    error = e
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, fut, result, error)
                del result, error
            del loop, fut, run, fn
            self._idle.release()
        self._jobs.put(None)  # the next thread stops too

    def shutdown(self) -> None:
        """Cancel the queued jobs; each thread stops after the job it runs."""
        self._closed = True
        with contextlib.suppress(queue.Empty):
            while (job := self._jobs.get_nowait()) is not None:
                job[1].cancel()
        self._jobs.put(None)


class LibvirtBackend:
    """Implements neurond.core.backend.Backend on libvirt-python."""

    def __init__(self, uri: str, sink: EventSink, workers: int = 4) -> None:
        self._uri = uri
        self._sink = sink
        self._workers = _Workers(workers, "libvirt")
        # Guest agent commands wait up to timeouts.guest_agent_s each: their own threads, so
        # unresponsive agents cannot hold up lifecycle calls.
        self._agent_workers = _Workers(workers, "libvirt-agent")
        self._conn: libvirt.virConnect | None = None
        self._callbacks: list[int] = []
        # Per domain, since its last read: the domain of the last event when every event
        # changed only its state (get_domain may then read the state alone), else None.
        self._events: dict[str, libvirt.virDomain | None] = {}
        # Per domain, its last XML and what summarize() made of it (equal XML, equal summary).
        self._summaries: dict[str, tuple[str, DomainSummary]] = {}
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
        def open_() -> libvirt.virConnect:
            faults.hit("virt.open")
            return libvirt.open(self._uri)

        try:
            conn = await self._workers.run(open_)
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
                    None, libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, self._on_agent, None
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
        self._events.clear()  # events were missed while disconnected: read everything
        self._conn = conn

    def _on_lifecycle(
        self, _conn: Any, dom: libvirt.virDomain, event: int, detail: int, _opaque: Any
    ) -> None:
        uuid = dom.UUIDString().lower()
        only_state = (event, detail) in _STATE_ONLY_EVENTS
        full_pending = uuid in self._events and self._events[uuid] is None
        self._events[uuid] = None if full_pending or not only_state else dom
        self._sink.domain_event(uuid)

    def _on_agent(self, _conn: Any, dom: libvirt.virDomain, *_args: Any) -> None:
        uuid = dom.UUIDString().lower()
        self._events[uuid] = None  # the agent channel's state is in the XML
        self._sink.domain_event(uuid)

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
        await self._workers.run(close)

    async def close(self) -> None:
        self._stopping = True
        self._lost.set()
        await self._drop()
        self._workers.shutdown()
        self._agent_workers.shutdown()

    # ---- calls --------------------------------------------------------------------------

    async def _call(
        self,
        point: str,
        fallback: type[NeuronError],
        doing: str,
        vm: str,
        fn: Callable[[libvirt.virConnect], T],
        workers: _Workers | None = None,
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
            return await (workers or self._workers).run(run)
        except libvirt.libvirtError as e:
            err = translate(e, fallback, doing, vm)
            if isinstance(err, LibvirtConnectionFailedError):
                self._lost.set()
            raise err from None

    def _summary(self, dom: libvirt.virDomain) -> DomainSummary:
        xml, uuid = dom.XMLDesc(0), dom.UUIDString()
        last = self._summaries.get(uuid)
        if last is not None and last[0] == xml:
            return last[1]  # parsing is most of a read's time on a local driver
        summary = summarize(xml)
        self._summaries[uuid] = (xml, summary)
        return summary

    def _info(self, dom: libvirt.virDomain) -> DomainInfo:
        summary = self._summary(dom)
        state, reason = dom.state()
        ours, reason_name = from_libvirt(state, reason)
        return DomainInfo.of(
            summary, ours, reason_name, bool(dom.isPersistent()), bool(dom.autostart())
        )

    async def list_domains(self) -> list[DomainInfo]:
        self._events.clear()  # a read of every domain: later events are what is new

        def list_(conn: libvirt.virConnect) -> list[DomainInfo]:
            self._summaries.clear()  # forget the undefined ones
            out = []
            for dom in conn.listAllDomains(0):
                try:
                    out.append(self._info(dom))
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise  # a domain undefined while we list it is simply gone
            return out

        return await self._call("virt.list", OperationFailedError, "list the domains", "", list_)

    async def get_domain(self, uuid: str, full: bool = True) -> DomainInfo | DomainState | None:
        event_dom = self._events.pop(uuid, None)  # every later event makes another refresh

        def get(conn: libvirt.virConnect) -> DomainInfo | DomainState | None:
            try:
                if event_dom is not None and not full:
                    return _state_of(event_dom)  # one RPC, not five
                return self._info(conn.lookupByUUIDString(uuid))
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    self._summaries.pop(uuid, None)
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
        return await self._act_reading(point, fallback, doing, uuid, fn, self._info)

    async def _act_reading(
        self,
        point: str,
        fallback: type[NeuronError],
        doing: str,
        uuid: str,
        fn: Callable[[libvirt.virDomain], object],
        read: Callable[[libvirt.virDomain], T],
    ) -> T | None:
        """``_act`` with the read of one's choice (the state alone after a pause or resume,
        which change nothing else)."""
        fresh: list[T] = []

        def act(d: libvirt.virDomain) -> None:
            fn(d)
            with contextlib.suppress(libvirt.libvirtError):
                fresh.append(read(d))

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

    async def suspend(self, uuid: str) -> DomainState | None:
        return await self._act_reading(
            "virt.suspend", OperationFailedError, "pause", uuid, lambda d: d.suspend(), _state_of
        )

    async def resume(self, uuid: str) -> DomainState | None:
        return await self._act_reading(
            "virt.resume", OperationFailedError, "resume", uuid, lambda d: d.resume(), _state_of
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
                # The balloon moves the current memory down, or up to the running maximum.
                _within_live_maximum(uuid, "memory", mib, d.maxMemory() // 1024, " MiB")
                _live(uuid, "memory", lambda: d.setMemoryFlags(kib, libvirt.VIR_DOMAIN_AFFECT_LIVE))
            # The persistent definition: maximum and current both become ``mib``, the memory the
            # VM boots with (a lower maximum also lowers the current memory, so it goes first).
            d.setMemoryFlags(kib, config | maximum)
            d.setMemoryFlags(kib, config)

        return await self._act(
            "virt.set_memory", OperationFailedError, "set the memory of", uuid, set_
        )

    async def set_vcpus(self, uuid: str, count: int, live: bool) -> DomainInfo | None:
        config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        live_flag = libvirt.VIR_DOMAIN_AFFECT_LIVE

        def set_(d: libvirt.virDomain) -> None:
            if live and d.isActive():  # first: a refused live change changes nothing
                most = d.vcpusFlags(live_flag | libvirt.VIR_DOMAIN_VCPU_MAXIMUM)
                _within_live_maximum(uuid, "vCPUs", count, most, "")  # hot-plug up to it
                _live(uuid, "vCPUs", lambda: d.setVcpusFlags(count, live_flag))
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
                point, OperationFailedError, doing, uuid, on_domain, self._agent_workers
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
