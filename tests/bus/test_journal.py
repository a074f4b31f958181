"""What neurond writes to a real journald (API.md, Errors: the journal entry of a failure carries
the facts as structured fields; an unexpected exception's traceback goes to the journal only).

journald runs in a private mount namespace (tests/journal.py); neurond runs inside it with
``--log-target journal`` (the harness passes ``--log-target console`` first; argparse keeps the
last occurrence, so extra_args win).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.bus.conftest import ERR, MANAGER, MANAGER_PATH, CallFailed, Client
from tests.harness import Daemon
from tests.journal import PrivateJournal

IDENT = {"SYSLOG_IDENTIFIER": "neurond"}


@pytest.fixture
def journal() -> Iterator[PrivateJournal]:
    with PrivateJournal() as j:
        yield j


@pytest.fixture
def journal_daemon(journal: PrivateJournal, start_daemon: Callable[..., Daemon]) -> Daemon:
    d = start_daemon(
        wrap=journal.wrap,
        extra_args=["--log-target", "journal", "--test-hooks"],
        env={"NEUROND_FAULTS": "bus.ListVMs:error"},
    )
    # The start-up lines reach this journal: the namespace and the target both work.
    journal.wait_for(lambda e: "ready" in e.get("MESSAGE", ""), timeout=5, **IDENT)
    return d


def test_log_goes_to_the_journal_not_to_stderr(
    journal: PrivateJournal, journal_daemon: Daemon
) -> None:
    ready = journal.wait_for(lambda e: "ready" in e["MESSAGE"], **IDENT)
    assert ready["PRIORITY"] == "6"
    assert ready["_PID"] == str(journal_daemon.pid), ready  # from neurond itself
    assert "ready" not in journal_daemon.stderr_text()


async def test_failure_entry_carries_the_facts(
    journal: PrivateJournal, journal_daemon: Daemon, client: Client
) -> None:
    with pytest.raises(CallFailed) as failed:
        await client.call(MANAGER_PATH, MANAGER, "GetVM", "s", ["nosuchvm"])
    assert failed.value.name == ERR + "VMNotFound"
    sender = client.bus.unique_name
    assert sender

    entry = journal.wait_for(NEUROND_CODE="VM_NOT_FOUND", NEUROND_SENDER=sender, **IDENT)

    assert entry["NEUROND_ERROR"] == ERR + "VMNotFound"
    assert entry["NEUROND_METHOD"] == f"{MANAGER}.GetVM"
    assert entry["NEUROND_VM"] == "nosuchvm"
    assert "nosuchvm" in entry["MESSAGE"]
    # The caller's uid (this test runs as root), resolved from the bus even for a read.
    assert entry.get("NEUROND_UID") == "0", f"no NEUROND_UID in {sorted(entry)}"
    # A caller's mistake is a warning or milder, never an error of the daemon.
    assert entry["PRIORITY"] in {"4", "5", "6"}, entry["PRIORITY"]
    assert entry["CODE_FILE"].endswith(".py") and "/neurond/" in entry["CODE_FILE"], entry
    assert entry["CODE_FUNC"], entry
    assert entry["CODE_LINE"].isdigit(), entry
    assert "NEUROND_TRACEBACK" not in entry  # an expected error has no traceback
    # Exactly one entry for the one failed call.
    same = journal.entries(NEUROND_SENDER=sender, NEUROND_METHOD=f"{MANAGER}.GetVM", **IDENT)
    assert len(same) == 1, same


async def test_internal_error_traceback_in_journal_not_in_reply(
    journal: PrivateJournal, journal_daemon: Daemon, client: Client
) -> None:
    with pytest.raises(CallFailed) as failed:
        await client.call(MANAGER_PATH, MANAGER, "ListVMs")
    err = failed.value
    assert err.name == ERR + "Internal"
    # A single short sentence: no traceback, no exception class, no file names.
    assert err.signature == "s" and len(err.body) == 1, (err.signature, err.body)
    for leak in ("Traceback", "InjectedFault", "injected fault", 'File "', ".py", "\n"):
        assert leak not in err.text, err.text
    assert 0 < len(err.text) < 300

    sender = client.bus.unique_name
    assert sender
    entry = journal.wait_for(
        lambda e: "NEUROND_TRACEBACK" in e,
        NEUROND_SENDER=sender,
        NEUROND_METHOD=f"{MANAGER}.ListVMs",
        **IDENT,
    )
    tb = entry["NEUROND_TRACEBACK"]
    assert tb.startswith("Traceback (most recent call last):"), tb
    assert "InjectedFault: injected fault at bus.ListVMs" in tb, tb
    assert entry["PRIORITY"] == "3", entry["PRIORITY"]  # LOG_ERR: the daemon's own fault
    assert entry.get("NEUROND_UID") == "0", f"no NEUROND_UID in {sorted(entry)}"
    assert entry["CODE_FILE"] and entry["CODE_FUNC"], entry
    # Logged once: the traceback entry is the only one for this call.
    same = journal.entries(NEUROND_SENDER=sender, NEUROND_METHOD=f"{MANAGER}.ListVMs", **IDENT)
    assert len(same) == 1, [e["MESSAGE"] for e in same]

    # The failure was the call's, not the daemon's: it still serves.
    (errors,) = await client.call(MANAGER_PATH, MANAGER, "ListErrors")
    assert errors


async def test_catalogued_events_carry_their_message_ids(
    journal: PrivateJournal, journal_daemon: Daemon, client: Client
) -> None:
    from neurond import messages
    from tests.bus.conftest import TEST_PATH, VM
    from tests.harness import busctl

    journal.wait_for(MESSAGE_ID=messages.LIBVIRT_RESTORED, **IDENT)
    journal.wait_for(MESSAGE_ID=messages.VM_CREATED, NEUROND_VM="test", **IDENT)
    await client.call(TEST_PATH, VM, "ForceOff")
    stopped = journal.wait_for(MESSAGE_ID=messages.VM_STOPPED, NEUROND_VM="test", **IDENT)
    assert stopped["NEUROND_REASON"] == "destroyed"
    await client.call(TEST_PATH, VM, "Start", "a{sv}", [{}])
    journal.wait_for(MESSAGE_ID=messages.VM_STARTED, NEUROND_VM="test", **IDENT)
    refused = busctl(
        journal_daemon.bus, "call", "org.neuronos.Neuron1", TEST_PATH, VM, "Pause", as_nobody=True
    )
    assert refused.returncode != 0
    denied = journal.wait_for(MESSAGE_ID=messages.AUTHORIZATION_DENIED, **IDENT)
    assert denied["NEUROND_UID"] == "65534" and denied["NEUROND_CODE"] == "PERMISSION_DENIED"
