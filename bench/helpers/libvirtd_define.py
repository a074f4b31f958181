"""How long real libvirtd takes to define (and undefine) N tiny shut-off domains.

    flock /tmp/neurond-libvirtd.lock .venv/bin/python bench/helpers/libvirtd_define.py [N]

Starts virtlogd/libvirtd as TESTING.md does if they are not running (and stops only what it
started), defines bench-NNNN domains (type qemu, 64 MiB, no disk) on qemu:///system, lists
them, then undefines every one it defined, also on failure. Prints the timings.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import libvirt

PREFIX = "bench-"


def xml(i: int) -> str:
    return (f"<domain type='qemu'><name>{PREFIX}{i:04d}</name>"
            f"<uuid>62656e63-6800-4000-8000-{i:012x}</uuid>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='q35'>hvm</type></os></domain>")  # fmt: skip


def alive(pidfile: str) -> bool:
    """The pidfile names a live process (a zombie left by ``-d``'s fork is not one)."""
    try:
        pid = int(Path(pidfile).read_text().strip())
        os.kill(pid, 0)
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, ValueError):
        return False
    return "\nState:\tZ" not in status


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    libvirt.registerErrorHandler(lambda *a: None, None)
    started = []
    kvm = Path("/dev/kvm")
    if kvm.exists():
        shutil.chown(kvm, group="kvm")
        kvm.chmod(0o660)
    for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
        if not alive(pidfile):
            subprocess.run([daemon, "-d"], check=True, timeout=30)
            started.append(pidfile)
    try:
        for _ in range(100):
            try:
                conn = libvirt.open("qemu:///system")
                break
            except libvirt.libvirtError:
                time.sleep(0.1)
        else:
            raise SystemExit("libvirtd does not answer")
        defined = []
        try:
            t = time.perf_counter()
            for i in range(n):
                defined.append(conn.defineXML(xml(i)))
            define_s = time.perf_counter() - t
            t = time.perf_counter()
            listed = [d for d in conn.listAllDomains() if d.name().startswith(PREFIX)]
            list_s = time.perf_counter() - t
            print(f"defined {n} domains in {define_s:.2f} s "
                  f"({define_s / n * 1e3:.1f} ms each); listAllDomains saw {len(listed)} "
                  f"in {list_s * 1e3:.1f} ms")  # fmt: skip
        finally:
            t = time.perf_counter()
            for d in conn.listAllDomains():
                if d.name().startswith(PREFIX):
                    d.undefine()
            print(f"undefined them in {time.perf_counter() - t:.2f} s")
            conn.close()
    finally:
        for pidfile in reversed(started):
            os.kill(int(Path(pidfile).read_text().strip()), signal.SIGTERM)


if __name__ == "__main__":
    main()
