"""The libvirt backend's worker threads (neurond.virt.backend._Workers), with real threads:
what run_in_executor on a ThreadPoolExecutor gave the backend, it must still give."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from neurond.virt.backend import _Workers

where: contextvars.ContextVar[str] = contextvars.ContextVar("where", default="unset")


async def test_a_call_runs_in_a_worker_thread_in_the_callers_context() -> None:
    workers = _Workers(2, "test")
    where.set("caller")
    name, seen = await workers.run(lambda: (threading.current_thread().name, where.get()))
    assert name.startswith("test_") and name != threading.current_thread().name
    assert seen == "caller"
    workers.shutdown()


async def test_an_exception_reaches_the_caller() -> None:
    workers = _Workers(1, "test")

    def fail() -> None:
        raise ValueError("from the thread")

    with pytest.raises(ValueError, match="from the thread"):
        await workers.run(fail)
    workers.shutdown()


async def test_at_most_size_threads_run_at_once_and_a_timed_out_queued_call_never_runs() -> None:
    workers = _Workers(2, "test")
    release = threading.Event()
    ran: list[str] = []

    def blocked(tag: str) -> str:
        release.wait(10)
        ran.append(tag)
        return tag

    first = workers.run(lambda: blocked("a"))
    second = workers.run(lambda: blocked("b"))
    queued = workers.run(lambda: blocked("c"))  # no third thread: it waits in the queue
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(queued, 0.2)  # the caller gives up: the future is cancelled
    release.set()
    assert await asyncio.gather(first, second) == ["a", "b"]
    await workers.run(lambda: None)  # after "c" had its turn in the queue
    assert sorted(ran) == ["a", "b"]
    workers.shutdown()


async def test_shutdown_cancels_the_queued_calls_and_refuses_new_ones() -> None:
    workers = _Workers(1, "test")
    release = threading.Event()
    running = workers.run(lambda: release.wait(10))
    queued = workers.run(lambda: None)
    await asyncio.sleep(0.05)
    workers.shutdown()
    assert queued.cancelled()
    release.set()
    assert await running is True  # the call in progress still ends and answers
    with pytest.raises(RuntimeError):
        workers.run(lambda: None)
