"""Tests of neurond.log: context binding, the three output formats, and a real journald."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from neurond import log
from neurond.errors import InvalidConfigError, VMNotFoundError
from tests.journal import JOURNALD, PrivateJournal

ROOT = Path(__file__).resolve().parents[2]
logger = logging.getLogger("neurond.test")


@pytest.fixture(autouse=True)
def _restore_neurond_logger() -> Iterator[None]:
    # setup() reconfigures a process-wide logger: give the next test the one it found.
    base = logging.getLogger("neurond")
    saved = (list(base.handlers), base.level, base.propagate)
    yield
    for handler in list(base.handlers):
        base.removeHandler(handler)
        if handler not in saved[0]:
            handler.close()
    for handler in saved[0]:
        base.addHandler(handler)
    base.setLevel(saved[1])
    base.propagate = saved[2]


def test_bind_nests_maps_keys_and_resets() -> None:
    assert log.current_context() == {}
    with log.bind(vm="win11", uuid="u-1", uid=1000):
        with log.bind(job=7, sender=":1.42", method="Start", vm=None, pci_slot="01:00.0"):
            assert log.current_context() == {
                "NEUROND_VM_UUID": "u-1",
                "NEUROND_UID": "1000",
                "NEUROND_JOB": "7",
                "NEUROND_SENDER": ":1.42",
                "NEUROND_METHOD": "Start",
                "NEUROND_PCI_SLOT": "01:00.0",
            }
        assert log.current_context() == {
            "NEUROND_VM": "win11",
            "NEUROND_VM_UUID": "u-1",
            "NEUROND_UID": "1000",
        }
    assert log.current_context() == {}


async def test_context_is_per_asyncio_task() -> None:
    async def worker(name: str) -> list[str]:
        seen = []
        with log.bind(vm=name):
            for _ in range(3):
                await asyncio.sleep(0)  # interleave the tasks
                seen.append(log.current_context()["NEUROND_VM"])
        return seen

    a, b = await asyncio.gather(worker("a"), worker("b"))
    assert (a, b) == (["a"] * 3, ["b"] * 3)
    assert log.current_context() == {}


async def test_context_reaches_threads_through_copied_context() -> None:
    with log.bind(vm="win11"):
        assert await asyncio.to_thread(log.current_context) == {"NEUROND_VM": "win11"}
        ctx = contextvars.copy_context()
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(ctx.run, log.current_context).result() == {"NEUROND_VM": "win11"}
            # run_in_executor does not copy the context: this is why callers must.
            assert pool.submit(log.current_context).result() == {}


def test_console_format(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("console", "debug")
    with log.bind(vm="win 11", sender=":1.42"):
        logger.debug("starting", extra={"fields": {"NEUROND_STEP": 2}})
    line = capsys.readouterr().err
    assert line.count("\n") == 1
    assert " DEBUG neurond.test: starting " in line
    assert line.rstrip().endswith('vm="win 11" sender=:1.42 step=2')


def test_json_format_has_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("json", "info")
    with log.bind(vm="win11"):
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("it failed", extra={"fields": {"NEUROND_FOO": 1, "MESSAGE": "x"}})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["MESSAGE"] == "it failed"  # an extra field cannot replace the record's own
    assert entry["LEVEL"] == "error"
    assert entry["PRIORITY"] == "3"
    assert entry["SYSLOG_IDENTIFIER"] == "neurond"
    assert entry["LOGGER"] == "neurond.test"
    assert entry["CODE_FUNC"] == "test_json_format_has_every_field"
    assert entry["NEUROND_VM"] == "win11"
    assert entry["NEUROND_FOO"] == "1"
    assert "RuntimeError: boom" in entry["NEUROND_TRACEBACK"]
    assert "TIMESTAMP" in entry


def test_log_error_fields(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("json")
    err = VMNotFoundError(
        "No VM named win11.", details={"name": "win11", "gpu-address": "0000:01:00.0", "_9x": 1}
    )
    log_line = sys._getframe().f_lineno + 1
    log.log_error(logger, err)
    entry = json.loads(capsys.readouterr().err)
    assert entry["MESSAGE"] == "No VM named win11."
    assert entry["PRIORITY"] == "4"
    assert entry["NEUROND_CODE"] == "VM_NOT_FOUND"
    assert entry["NEUROND_ERROR"] == "org.neuronos.Neuron1.Error.VMNotFound"
    assert entry["NEUROND_NAME"] == "win11"
    assert entry["NEUROND_GPU_ADDRESS"] == "0000:01:00.0"
    assert entry["NEUROND_X"] == "1"
    # The caller's place, not log_error's.
    assert (entry["CODE_FUNC"], entry["CODE_LINE"]) == ("test_log_error_fields", str(log_line))


def test_setup_twice_does_not_duplicate(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("console")
    log.setup("console")
    logger.info("once")
    assert capsys.readouterr().err.count("once") == 1
    assert len(logging.getLogger("neurond").handlers) == 1


@pytest.mark.parametrize(
    ("target", "level", "named"), [("syslog", "info", "syslog"), ("json", "loud", "loud")]
)
def test_invalid_config_keeps_old_setup(target: str, level: str, named: str) -> None:
    log.setup("json", "debug")
    before = list(logging.getLogger("neurond").handlers)
    with pytest.raises(InvalidConfigError, match=named):
        log.setup(target, level)
    assert logging.getLogger("neurond").handlers == before


def test_auto_without_socket_is_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "JOURNAL_SOCKET", "/nonexistent/socket")
    log.setup("auto")
    (handler,) = logging.getLogger("neurond").handlers
    assert isinstance(handler.formatter, log.ConsoleFormatter)


def test_journal_without_systemd_python_is_console(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "systemd.journal", None)  # makes the import fail
    log.setup("journal")
    (handler,) = logging.getLogger("neurond").handlers
    assert isinstance(handler.formatter, log.ConsoleFormatter)
    assert "systemd-python is not installed" in capsys.readouterr().err


def test_journal_send_failure_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_send(*_args: object, **_kwargs: object) -> None:
        raise OSError("socket gone")

    log.setup("journal")
    (handler,) = logging.getLogger("neurond").handlers
    monkeypatch.setattr(handler, "_send", broken_send)
    monkeypatch.setattr(logging, "raiseExceptions", False)  # keep handleError quiet
    logger.error("still fine")


# --- a real journald -------------------------------------------------------------------------

needs_journald = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(JOURNALD) or shutil.which("nsenter") is None,
    reason="needs root, systemd-journald and nsenter",
)


@pytest.fixture(scope="module")
def journal() -> Iterator[PrivateJournal]:
    with PrivateJournal() as j:
        yield j


_CHILD = textwrap.dedent(
    """
    import logging, sys
    from neurond import log
    from neurond.errors import VMNotFoundError

    def report_missing_vm():
        err = VMNotFoundError("No VM named win11.", details={"name": "win11"})
        with log.bind(vm="win11", sender=":1.42", uid=1000, test=sys.argv[1]):
            log.log_error(logging.getLogger("neurond.vm"), err)
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                logging.getLogger("neurond.vm").exception("unexpected failure")

    log.setup(sys.argv[2])
    print(type(logging.getLogger("neurond").handlers[0]).__name__)
    report_missing_vm()
    """
)


def _run_child(journal: PrivateJournal, target: str) -> tuple[str, str]:
    marker = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        journal.wrap([sys.executable, "-c", _CHILD, marker, target]),
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=30,
    )
    return marker, out.stdout.strip()


@needs_journald
def test_journal_entry_fields(journal: PrivateJournal) -> None:
    marker, handler = _run_child(journal, "journal")
    assert handler == "JournalHandler"
    entry = journal.wait_for(NEUROND_TEST=marker, NEUROND_CODE="VM_NOT_FOUND")
    assert entry["MESSAGE"] == "No VM named win11."
    expected = {
        "SYSLOG_IDENTIFIER": "neurond",
        "PRIORITY": "4",
        "NEUROND_ERROR": "org.neuronos.Neuron1.Error.VMNotFound",
        "NEUROND_VM": "win11",
        "NEUROND_SENDER": ":1.42",
        "NEUROND_UID": "1000",
        "NEUROND_NAME": "win11",
        "LOGGER": "neurond.vm",
        "CODE_FUNC": "report_missing_vm",
        "CODE_FILE": "<string>",
    }
    assert {k: entry.get(k) for k in expected} == expected
    assert int(entry["CODE_LINE"]) > 0

    crash = journal.wait_for(NEUROND_TEST=marker, PRIORITY="3")
    assert crash["MESSAGE"] == "unexpected failure"  # one line; the traceback is its own field
    assert "RuntimeError: boom" in crash["NEUROND_TRACEBACK"]
    assert crash["NEUROND_VM"] == "win11"


@needs_journald
def test_auto_picks_journal_when_socket_exists(journal: PrivateJournal) -> None:
    marker, handler = _run_child(journal, "auto")
    assert handler == "JournalHandler"
    journal.wait_for(NEUROND_TEST=marker, SYSLOG_IDENTIFIER="neurond")


@needs_journald
def test_private_journal_starts_fast(journal: PrivateJournal) -> None:
    # TESTING.md promises ~30 ms; a generous bound still catches a broken wait loop.
    assert journal.startup_s is not None and journal.startup_s < 2.0
