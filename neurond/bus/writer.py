"""A message writer for dbus-fast's asyncio bus that survives a full socket.

dbus-fast 5.2.0's ``_MessageWriter.write_callback`` treats ``BlockingIOError`` (the kernel's
socket buffer is full, normal under load: 50 callers of a 256 KB reply) as fatal and drops the
whole bus connection. This subclass waits for the socket to become writable instead, and keeps
a partly written message at the head of the queue so a new message is never interleaved into
it. dbus-fast is pinned in pyproject.toml because this replaces a private class; the regression
test is tests/bus/test_load.py.
"""

from __future__ import annotations

import array
import socket
from typing import Any

from dbus_fast.aio import message_bus as _aio

_Base: Any = _aio._MessageWriter


class SafeMessageWriter(_Base):  # type: ignore[misc]
    """``_MessageWriter`` whose write loop treats a full socket as "wait", not as a dead bus.

    The loop mirrors dbus-fast 5.2.0's own, with EAGAIN handled.
    """

    buf: memoryview | None
    offset: int

    def write_callback(self, remove_writer: bool = True) -> None:
        sock = self.sock
        try:
            while True:
                if self.buf is None:
                    if not self.messages:
                        if remove_writer:
                            self.loop.remove_writer(self.fd)
                        return
                    buf, unix_fds, fut = self.messages.popleft()
                    self.unix_fds, self.buf, self.offset, self.fut = (
                        unix_fds,
                        memoryview(buf),
                        0,
                        fut,
                    )
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        fds = array.array("i", self.unix_fds)
                        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                        self.offset += sock.sendmsg([self.buf[self.offset :]], ancdata)
                        self.unix_fds = None
                    else:
                        self.offset += sock.send(self.buf[self.offset :])
                except (BlockingIOError, InterruptedError):
                    # Full socket: resume at the same offset once it is writable again.
                    self.loop.add_writer(self.fd, self.write_callback)
                    return
                if self.offset < len(self.buf):
                    self.loop.add_writer(self.fd, self.write_callback)
                    return
                self.buf = None
                if self.fut is not None and not self.fut.done():
                    self.fut.set_result(None)
        except OSError as e:
            if self.fut is not None and not self.fut.done():
                if self.bus._user_disconnect:
                    self.fut.set_result(None)
                else:
                    self.fut.set_exception(e)
            self.bus._finalize(e)


def install(bus: Any) -> None:
    """Replace a connected bus's writer, keeping whatever it has queued."""
    old = bus._writer
    new = SafeMessageWriter(bus)
    new.messages = old.messages
    new.buf, new.offset, new.unix_fds, new.fut = old.buf, old.offset, old.unix_fds, old.fut
    bus._writer = new
