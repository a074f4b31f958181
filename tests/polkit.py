"""A real polkitd on a private bus, with the project's actions and a test's rules (TESTING.md).

polkitd reads its actions and rules from fixed directories, so it runs inside a private mount
namespace where our directories are bind-mounted over /usr/share/polkit-1/actions,
/usr/share/polkit-1/rules.d and /etc/polkit-1/rules.d; the host's polkit is untouched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.harness import PrivateBus

REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "polkit" / "org.neuronos.neuron1.policy"
OWNER_RULES = REPO / "polkit" / "70-neurond-owner.rules"
POLKITD = "/usr/lib/polkit-1/polkitd"


class PrivatePolkit:
    """polkitd serving ``bus`` (which must include the system policies) with ``rules`` (JS).

    ``shipped_rules`` adds the project's owner rules (70-neurond-owner.rules) after the test's
    (50-test.rules), as a distribution that installs them has them.
    """

    def __init__(self, bus: PrivateBus, rules: str, shipped_rules: bool = False) -> None:
        self.bus = bus
        self.dir = Path(tempfile.mkdtemp(prefix="neurond-polkit-"))
        self.actions = self.dir / "actions"
        self.rules = self.dir / "rules.d"
        self.empty = self.dir / "empty"
        for d in (self.actions, self.rules, self.empty):
            d.mkdir()
        shutil.copy(POLICY, self.actions)
        (self.rules / "50-test.rules").write_text(rules)
        if shipped_rules:
            shutil.copy(OWNER_RULES, self.rules)
        for p in (self.dir, self.actions, self.rules, self.empty):
            p.chmod(0o755)  # polkitd drops to its own user and must read them
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Self:
        script = (
            f"mount --bind {self.actions} /usr/share/polkit-1/actions && "
            f"mount --bind {self.rules} /usr/share/polkit-1/rules.d && "
            f"mkdir -p /etc/polkit-1/rules.d && mount --bind {self.empty} /etc/polkit-1/rules.d && "
            f"exec {POLKITD} --no-debug"
        )
        with open(self.dir / "polkitd.log", "wb") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                env=self.bus.env(),
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._owned():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("polkitd did not start: " + self.log())
            time.sleep(0.05)
        return self

    def _owned(self) -> bool:
        out = subprocess.run(
            ["busctl", "--system", "status", "org.freedesktop.PolicyKit1"],
            env=self.bus.env(),
            capture_output=True,
            text=True,
            check=False,
        )
        return out.returncode == 0

    def log(self) -> str:
        path = self.dir / "polkitd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
