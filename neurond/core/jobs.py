"""Long operations as Job objects: progress, cancel, completion and linger (udisks2-style)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any, Protocol

from neurond import log
from neurond.errors import CancelledError, InternalError, NeuronError

_log = logging.getLogger("neurond.jobs")

PROGRESS_INTERVAL_S = 0.5  # API.md: Progress, Bytes and Rate change at most twice a second


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


class JobListener(Protocol):
    def job_added(self, job: Job) -> None: ...
    def job_changed(self, job: Job, changed: dict[str, Any]) -> None: ...
    def job_completed(self, job: Job) -> None: ...
    def job_removed(self, job: Job) -> None: ...


class Slot(Protocol):
    """Admission for jobs that share a limit (asyncio.Semaphore is one)."""

    async def acquire(self) -> Any: ...
    def release(self) -> None: ...


class Job:
    """One long operation. Its work is a coroutine given the job (to report progress)."""

    def __init__(
        self, manager: JobManager, number: int, operation: str, uid: int, objects: list[str]
    ) -> None:
        self._manager = manager
        self.number = number
        self.operation = operation
        self.started_by_uid = uid
        self.objects = list(objects)
        self.start_time_us = time.time_ns() // 1000
        self.state = JobState.QUEUED
        self.progress = 0.0
        self.progress_valid = False
        self.bytes = 0
        self.total_bytes = 0
        self.rate = 0
        self.cancelable = True
        self.error: NeuronError | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_progress = 0.0
        self.done = asyncio.Event()

    @property
    def error_name(self) -> str:
        return self.error.dbus_name() if self.error else ""

    @property
    def error_message(self) -> str:
        return self.error.message if self.error else ""

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def _set(self, **changes: Any) -> None:
        changed = {k: v for k, v in changes.items() if getattr(self, k) != v}
        for k, v in changed.items():
            setattr(self, k, v)
        if changed:
            self._manager.listener.job_changed(self, changed)

    def report(
        self,
        progress: float | None = None,
        *,
        done_bytes: int | None = None,
        total_bytes: int | None = None,
        rate: int | None = None,
        force: bool = False,
    ) -> None:
        """Record progress; signalled at most every PROGRESS_INTERVAL_S unless forced."""
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return  # throttled: the next report carries the newer values
        self._last_progress = now
        changes: dict[str, Any] = {}
        if progress is not None:
            changes["progress"] = max(0.0, min(1.0, progress))
            changes["progress_valid"] = True
        if done_bytes is not None:
            changes["bytes"] = done_bytes
        if total_bytes is not None:
            changes["total_bytes"] = total_bytes
        if rate is not None:
            changes["rate"] = rate
        self._set(**changes)

    def cancel(self) -> bool:
        """Ask the job to stop; False when it has already finished."""
        if self.finished or self._task is None:
            return False
        self._task.cancel()
        return True

    async def _run(self, work: Callable[[Job], Awaitable[None]]) -> None:
        with log.bind(job=str(self.number)):
            self._set(state=JobState.RUNNING)
            try:
                await work(self)
            except asyncio.CancelledError:
                self._finish(
                    JobState.CANCELLED, CancelledError(f"The {self.operation} job was cancelled.")
                )
                return
            except NeuronError as e:
                log.log_error(_log, e, f"Job {self.number} ({self.operation}) failed: {e.message}")
                self._finish(JobState.FAILED, e)
                return
            except Exception as e:  # noqa: BLE001 - the job must end, whatever its work raised
                _log.error(
                    "Job %s (%s) failed unexpectedly", self.number, self.operation, exc_info=True
                )
                self._finish(
                    JobState.FAILED,
                    InternalError(f"The {self.operation} job failed unexpectedly.", cause=e),
                )
                return
            self._finish(JobState.COMPLETED, None)

    async def _run_in(self, slot: Slot, work: Callable[[Job], Awaitable[None]]) -> None:
        """Stay ``queued`` until ``slot`` admits the job, then run it, holding the slot."""
        try:
            await slot.acquire()
        except asyncio.CancelledError:
            with log.bind(job=str(self.number)):
                self._finish(
                    JobState.CANCELLED, CancelledError(f"The {self.operation} job was cancelled.")
                )
            return
        try:
            await self._run(work)
        finally:
            slot.release()

    def _finish(self, state: JobState, error: NeuronError | None) -> None:
        self.error = error
        changes: dict[str, Any] = {"state": state, "cancelable": False}
        if state is JobState.COMPLETED:
            changes.update(progress=1.0, progress_valid=True, rate=0)
        self._set(**changes)
        self.done.set()
        self._manager.listener.job_completed(self)
        self._manager._schedule_removal(self)


class JobManager:
    """Creates, tracks and retires jobs; numbers count up from 1 for the daemon's life."""

    def __init__(self, listener: JobListener, linger_s: float) -> None:
        self.listener = listener
        self.linger_s = linger_s
        self.jobs: dict[int, Job] = {}
        self._next = 1
        self._tasks: set[asyncio.Task[None]] = set()

    def start(
        self,
        operation: str,
        uid: int,
        objects: list[str],
        work: Callable[[Job], Awaitable[None]],
        slot: Slot | None = None,
    ) -> Job:
        """Start ``work`` as a job; with a ``slot`` it stays queued until the slot admits it."""
        job = Job(self, self._next, operation, uid, objects)
        self._next += 1
        self.jobs[job.number] = job
        self.listener.job_added(job)
        job._task = self._spawn(job._run(work) if slot is None else job._run_in(slot, work))
        return job

    def count_for_uid(self, uid: int) -> int:
        return sum(1 for j in self.jobs.values() if j.started_by_uid == uid and not j.finished)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _schedule_removal(self, job: Job) -> None:
        async def linger() -> None:
            await asyncio.sleep(self.linger_s)
            self._remove(job)

        self._spawn(linger())

    def _remove(self, job: Job) -> None:
        if self.jobs.pop(job.number, None) is not None:
            self.listener.job_removed(job)

    async def shutdown(self, timeout: float) -> None:
        """Cancel running jobs, wait (bounded) for them to end, drop lingering ones."""
        running = [j for j in self.jobs.values() if not j.finished]
        for j in running:
            j.cancel()
        if running:
            await asyncio.wait(
                [asyncio.ensure_future(j.done.wait()) for j in running], timeout=timeout
            )
        for t in list(self._tasks):
            t.cancel()
