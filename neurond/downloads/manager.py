"""Downloads as jobs: checks a DownloadImage call, then runs it as a ``download`` job.

At most ``downloads.max_parallel`` downloads run at once; the others stay ``queued`` (a
``Slots`` object admits them in order, and follows the limit across a config reload).
Two downloads to the same file name at once are refused: the second could only fail or
duplicate the first.
"""

from __future__ import annotations

import asyncio
import collections
import os
import stat
from typing import Any

from neurond.config import Config
from neurond.core.jobs import Job, JobManager
from neurond.downloads.request import DownloadRequest, check_request
from neurond.errors import InvalidArgumentError

OPERATION = "download"


class Slots:
    """A semaphore whose limit can change while jobs wait; FIFO admission."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    async def acquire(self) -> bool:
        if self.used < self.limit and not self._waiters:
            self.used += 1
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.used -= 1  # admitted and cancelled in the same turn: give the slot back
                self._wake()
            raise
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
        return True

    def release(self) -> None:
        self.used -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self.used += 1
                fut.set_result(None)


class DownloadManager:
    """Starts download jobs through the JobManager; the bus layer calls ``start``."""

    def __init__(self, jobs: JobManager, max_parallel: int = 2) -> None:
        self.jobs = jobs
        self.slots = Slots(max_parallel)
        self._active: dict[str, Job] = {}  # file name → its running or queued job

    def check(self, url: str, options: dict[str, Any], config: Config) -> DownloadRequest:
        """The checked request; InvalidArgumentError before anything is fetched."""
        request = check_request(
            url,
            sha256=options["sha256"],
            filename=options.get("filename", ""),
            size=options.get("size"),
            allow_insecure_loopback=config.downloads.allow_insecure_loopback,
        )
        target = config.storage.image_dir / request.filename
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise InvalidArgumentError(
                f"{target} cannot be examined: {e.strerror}.", details={"option": "filename"}
            ) from None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise InvalidArgumentError(
                f"{target} exists and is not a regular file; choose another filename.",
                details={"option": "filename"},
            )
        if st is not None and request.size is not None and st.st_size != request.size:
            raise InvalidArgumentError(
                f"{target} already exists with {st.st_size} bytes, not {request.size}; delete it "
                "or choose another filename.",
                details={"option": "filename"},
            )
        # Finished jobs leave here lazily (one cancelled while queued never ran its work).
        self._active = {k: j for k, j in self._active.items() if not j.finished}
        running = self._active.get(request.filename)
        if running is not None:
            raise InvalidArgumentError(
                f"Job {running.number} is already downloading to {target}.",
                details={"option": "filename", "job": running.number},
            )
        return request

    def downloading(self, filename: str) -> int | None:
        """The number of the job downloading to ``filename`` now, if any (DeleteImage)."""
        job = self._active.get(filename)
        return job.number if job is not None and not job.finished else None

    def start(self, request: DownloadRequest, uid: int, config: Config) -> Job:
        """Start (or queue) the download job; its ``Objects`` is empty."""
        # aiohttp is imported on the first download, not at start-up: it is a fifth of the
        # daemon's import time and most of its idle memory beyond the core (docs/benchmarks.md).
        from neurond.downloads.fetch import Settings, download

        self.slots.set_limit(config.downloads.max_parallel)
        d = config.downloads
        settings = Settings(
            image_dir=config.storage.image_dir,
            ca_bundle=d.ca_bundle,
            allow_insecure_loopback=d.allow_insecure_loopback,
            connect_timeout_s=d.connect_timeout_s,
            idle_timeout_s=d.idle_timeout_s,
            max_retries=d.max_retries,
            state_dir=config.storage.state_dir,
        )

        async def work(job: Job) -> None:
            await download(request, settings, job)

        job = self.jobs.start(OPERATION, uid, [], work, slot=self.slots)
        self._active[request.filename] = job
        return job
