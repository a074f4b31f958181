"""Soak: neurond's RSS, open fds and threads over many short-lived client connections.

    .venv/bin/python bench/soak.py [--rounds 10] [--connections 1000] [--calls 20]

Starts a private system bus and neurond on libvirt's test driver (tests/harness.py; the soak's
node of 8 running domains), then runs
ROUNDS rounds of the soak of tests/bus/test_soak.py (CONNECTIONS connections of CALLS mixed
calls each, reads, invalid calls and Pause/Resume, spread over 2 client processes) and samples
neurond's /proc/PID/status (VmRSS), /proc/PID/fd and /proc/PID/task after each round.
Prints a Markdown table; nothing is asserted (DESIGN.md: benchmarks never assert).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.bus.test_soak import make_node, resources, run_workers  # noqa: E402
from tests.harness import Daemon, PrivateBus  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def main(rounds: int, connections: int, calls: int) -> None:
    node_dir = tempfile.TemporaryDirectory(prefix="neurond-soak-")
    with (
        node_dir,
        PrivateBus() as bus,
        Daemon(bus, libvirt_uri=make_node(Path(node_dir.name))) as daemon,
    ):
        pid = daemon.pid
        rows = []
        fds, threads = resources(pid)
        rows.append((0, 0, 0.0, rss_kib(pid), fds, threads))
        total = 0
        for r in range(1, rounds + 1):
            t0 = time.monotonic()
            problems = await run_workers(bus.address, connections, calls)
            elapsed = time.monotonic() - t0
            total += connections * calls
            await asyncio.sleep(0.5)
            fds, threads = resources(pid)
            rows.append((r, total, elapsed, rss_kib(pid), fds, threads))
            if problems:
                print(f"round {r}: {len(problems)} wrong replies, e.g. {problems[0]}")
    print(f"neurond on the test driver, {connections} connections x {calls} calls per round, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| round | calls so far | round s | RSS MiB | open fds | threads |")
    print("|---|---|---|---|---|---|")
    for r, n, s, rss, f, t in rows:
        print(f"| {r} | {n} | {s:.1f} | {rss / 1024:.1f} | {f} | {t} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--calls", type=int, default=20)
    a = ap.parse_args()
    asyncio.run(main(a.rounds, a.connections, a.calls))
