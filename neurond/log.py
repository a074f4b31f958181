"""Logging for neurond: journald, console or JSON lines, with request context from contextvars.

Every record becomes one dict of journal fields (``record_fields``); the three targets only
differ in how they write that dict, so ``journalctl NEUROND_VM=win11`` and a JSON log line
carry the same names. Context (the VM, the D-Bus sender, the job, …) lives in a ContextVar,
so it follows asyncio tasks and executor calls run through ``contextvars.copy_context()``
(``asyncio.to_thread`` does that; ``loop.run_in_executor`` does not).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import stat
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from neurond.errors import InvalidConfigError, NeuronError

LOGGER_NAME = "neurond"
SYSLOG_IDENTIFIER = "neurond"
JOURNAL_SOCKET = "/run/systemd/journal/socket"

TARGETS = ("auto", "journal", "console", "json")
LEVELS: Mapping[str, int] = MappingProxyType(
    {
        "debug": logging.DEBUG,
        "info": logging.INFO,
        "warning": logging.WARNING,
        "error": logging.ERROR,
        "critical": logging.CRITICAL,
    }
)

# Context keys whose journal field is not simply NEUROND_<KEY>.
_KEY_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "vm": "NEUROND_VM",
        "uuid": "NEUROND_VM_UUID",
        "job": "NEUROND_JOB",
        "sender": "NEUROND_SENDER",
        "uid": "NEUROND_UID",
        "method": "NEUROND_METHOD",
    }
)

# Fields every record sets itself; extra fields must not overwrite them.
_RESERVED = frozenset(
    {"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "CODE_FILE", "CODE_LINE", "CODE_FUNC", "LOGGER"}
)

_FIELD_INVALID = re.compile(r"[^A-Z0-9_]")
_FIELD_MAX = 64  # journald drops fields with longer names

# Never mutated: bind() installs a new mapping, so a copied context cannot see later changes.
_CONTEXT: ContextVar[Mapping[str, str]] = ContextVar(
    "neurond_log_context", default=MappingProxyType({})
)


def _sanitize(name: str) -> str:
    """Upper-case ``name`` and make it a valid journal field name part ("" if nothing is left)."""
    cleaned = _FIELD_INVALID.sub("_", name.upper()).lstrip("_0123456789")
    return cleaned[:_FIELD_MAX]


def field_name(key: str) -> str:
    """The journal field for a context or detail key: vm → NEUROND_VM, state → NEUROND_STATE."""
    known = _KEY_FIELDS.get(key)
    if known is not None:
        return known
    return ("NEUROND_" + (_sanitize(key) or "FIELD"))[:_FIELD_MAX]


@contextlib.contextmanager
def _bound(fields: Mapping[str, str | int | None]) -> Iterator[None]:
    merged = dict(_CONTEXT.get())
    for key, value in fields.items():
        name = field_name(key)
        if value is None:
            merged.pop(name, None)  # None clears a field for the block
        else:
            merged[name] = str(value)
    token = _CONTEXT.set(MappingProxyType(merged))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def bind(**fields: str | int | None) -> contextlib.AbstractContextManager[None]:
    """Add context fields to every record logged inside the ``with`` block.

    Blocks nest; an inner value wins, and ``None`` removes a field for the block.
    """
    return _bound(fields)


def current_context() -> dict[str, str]:
    """The context fields now in force, as journal field names."""
    return dict(_CONTEXT.get())


def _priority(levelno: int) -> int:
    """The syslog priority for a logging level (no NOTICE/ALERT/EMERG in logging)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def _traceback(record: logging.LogRecord) -> str | None:
    parts: list[str] = []
    if record.exc_info and record.exc_info[0] is not None:
        parts.append("".join(traceback.format_exception(*record.exc_info)).rstrip())
    elif record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(record.stack_info)
    return "\n".join(parts) if parts else None


def record_fields(record: logging.LogRecord) -> dict[str, str]:
    """All journal fields of a record: context, then extra fields, then the record's own."""
    fields = current_context()
    extra: Any = getattr(record, "fields", None)
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            name = _sanitize(str(key))
            if name and name not in _RESERVED and value is not None:
                fields[name] = str(value)
    tb = _traceback(record)
    if tb is not None:
        fields["NEUROND_TRACEBACK"] = tb
    fields.update(
        MESSAGE=record.getMessage(),
        PRIORITY=str(_priority(record.levelno)),
        SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER,
        CODE_FILE=record.pathname,
        CODE_LINE=str(record.lineno),
        CODE_FUNC=record.funcName,
        LOGGER=record.name,
    )
    return fields


class JournalHandler(logging.Handler):
    """Sends each record to journald through the native protocol, one field per fact.

    Importing ``systemd.journal`` raises ImportError when systemd-python is missing;
    ``setup`` catches that and falls back to the console.
    """

    def __init__(self) -> None:
        super().__init__()
        import systemd.journal as journal  # optional dependency: only the journal target needs it

        self._send: Callable[..., None] = journal.send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = record_fields(record)
            message = fields.pop("MESSAGE")
            line = int(fields.pop("CODE_LINE"))
            self._send(message, CODE_LINE=line, **fields)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - a log call must never fail its caller
            self.handleError(record)


def _display_key(name: str) -> str:
    return name.removeprefix("NEUROND_").lower()


def _display_value(value: str) -> str:
    if value and not any(c.isspace() or c in '="' for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """One human line: time, level, logger, message, then the context and extra fields as k=v."""

    def format(self, record: logging.LogRecord) -> str:
        fields = record_fields(record)
        tb = fields.pop("NEUROND_TRACEBACK", None)
        when = datetime.datetime.fromtimestamp(record.created).isoformat(
            sep=" ", timespec="milliseconds"
        )
        line = f"{when} {record.levelname} {record.name}: {fields['MESSAGE']}"
        pairs = [
            f"{_display_key(k)}={_display_value(v)}"
            for k, v in fields.items()
            if k not in _RESERVED
        ]
        if pairs:
            line += " " + " ".join(pairs)
        return line + ("\n" + tb if tb else "")


class JsonFormatter(logging.Formatter):
    """One JSON object per line with every journal field, plus TIMESTAMP (UTC) and LEVEL."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        data = {
            "TIMESTAMP": when.isoformat(timespec="microseconds"),
            "LEVEL": record.levelname.lower(),
            **record_fields(record),
        }
        return json.dumps(data, ensure_ascii=False)


def journal_available() -> bool:
    """True when a journald socket is there (without one, journal.send silently drops)."""
    try:
        return stat.S_ISSOCK(os.stat(JOURNAL_SOCKET).st_mode)
    except OSError:
        return False


def _make_handler(target: str) -> tuple[logging.Handler, str | None]:
    """The handler for a resolved target, and a warning to log when it had to fall back."""
    if target == "journal":
        try:
            return JournalHandler(), None
        except ImportError:
            target = "console"
            warning: str | None = "systemd-python is not installed; logging to the console"
    else:
        warning = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if target == "json" else ConsoleFormatter())
    return handler, warning


def setup(target: str = "auto", level: str = "info") -> None:
    """Configure the ``neurond`` logger; call again on config reload to replace its handler.

    Arguments are checked before anything changes, so a bad reload keeps the old setup.
    """
    levelno = LEVELS.get(level.lower()) if isinstance(level, str) else None
    if levelno is None:
        raise InvalidConfigError(
            f"Unknown log level {level!r}; use one of {', '.join(LEVELS)}.",
            details={"key": "level", "value": level},
        )
    if target not in TARGETS:
        raise InvalidConfigError(
            f"Unknown log target {target!r}; use one of {', '.join(TARGETS)}.",
            details={"key": "target", "value": target},
        )
    if target == "auto":
        target = "journal" if journal_available() else "console"
    handler, warning = _make_handler(target)

    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(levelno)
    # The daemon owns its output: a root handler added by a library would print everything twice.
    logger.propagate = False
    if warning:
        logger.warning(warning)


def log_error(
    logger: logging.Logger,
    err: NeuronError,
    what: str | None = None,
    *,
    exc_info: bool = False,
    level: int = logging.WARNING,
    fields: dict[str, str] | None = None,
) -> None:
    """Log a NeuronError with its code, D-Bus name and details as journal fields
    (plus ``fields`` as given, e.g. a catalog MESSAGE_ID)."""
    fields = {**(fields or {}), "NEUROND_CODE": err.code, "NEUROND_ERROR": err.dbus_name()}
    for key, value in err.details.items():
        fields.setdefault(field_name(str(key)), str(value))
    # stacklevel=2: CODE_FUNC/CODE_LINE name the caller, not this helper.
    logger.log(
        level,
        what or err.message,
        exc_info=err if exc_info else None,
        extra={"fields": fields},
        stacklevel=2,
    )
