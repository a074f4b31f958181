"""Download throughput: neurond's fetch engine against curl, same file, same loopback server.

    .venv/bin/python bench/download.py [--size-mib 512] [--runs 3]

The server (tests/download_server.py, HTTPS with a trustme CA) runs in its own process so it
shares no interpreter with either client. Each run writes into a fresh temporary directory on
the same file system. neurond's figure includes what a DownloadImage job does besides the
transfer (sha256 of every byte, fsync, rename), so curl is also shown followed by sha256sum.
Prints a Markdown table; nothing is asserted (DESIGN.md: benchmarks never assert timings).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neurond.downloads.fetch import Settings, download  # noqa: E402
from neurond.downloads.request import check_request  # noqa: E402
from tests.download_server import sha256_of  # noqa: E402


class NullSink:
    def report(self, progress: float | None = None, **kw: object) -> None:
        pass


def run_curl(url: str, ca: Path, out: Path, with_hash: bool) -> float:
    start = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "--cacert", str(ca), "-o", str(out), url], check=True)
    if with_hash:
        subprocess.run(["sha256sum", str(out)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_neurond(url: str, ca: Path, directory: Path, digest: str) -> float:
    request = check_request(url, sha256=digest, allow_insecure_loopback=False)
    settings = Settings(image_dir=directory, ca_bundle=str(ca))
    start = time.perf_counter()
    asyncio.run(download(request, settings, NullSink()))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="neurond-bench-"))
    ca = work / "ca.pem"
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.download_server", str(ca)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        url = f"https://127.0.0.1:{port}/bench.iso?size={size}"
        digest = sha256_of(size)
        results: dict[str, list[float]] = {"curl": [], "curl + sha256sum": [], "neurond": []}
        for _ in range(args.runs):
            for name in results:
                d = Path(tempfile.mkdtemp(dir=work))
                if name == "neurond":
                    t = run_neurond(url, ca, d, digest)
                else:
                    t = run_curl(url, ca, d / "bench.iso", name != "curl")
                results[name].append(t)
                shutil.rmtree(d)
        print(
            f"{args.size_mib} MiB over HTTPS from 127.0.0.1, {args.runs} runs, "
            f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n"
        )
        print("| client | median s | MiB/s (median) | best MiB/s |")
        print("|---|---|---|---|")
        for name, times in results.items():
            med = statistics.median(times)
            print(
                f"| {name} | {med:.2f} | {args.size_mib / med:.0f} | "
                f"{args.size_mib / min(times):.0f} |"
            )
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
