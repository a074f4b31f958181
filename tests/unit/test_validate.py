"""Untrusted input: names, UUIDs and a{sv} readers name the bad key and change nothing."""

from __future__ import annotations

import pytest

from neurond import validate
from neurond.errors import InvalidArgumentError


@pytest.mark.parametrize("name", ["win11", "A", "a-b_c.d", "x" * 64, "0day"])
def test_good_names(name: str) -> None:
    assert validate.vm_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "-x", ".x", "a/b", "a b", "x" * 65, "$(reboot)", "a'b", 'a"b', "é", "a\nb"]
)
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidArgumentError):
        validate.vm_name(name)


def test_name_or_uuid() -> None:
    u = "6695EB01-F6A4-8304-79AA-97F2502E193F"
    assert validate.name_or_uuid(u) == u.lower()
    assert validate.name_or_uuid("test") == "test"
    for bad in ["", "../..", "x" * 1_000_000, "a\0b"]:
        with pytest.raises(InvalidArgumentError):
            validate.name_or_uuid(bad)


def test_long_input_is_not_echoed_whole() -> None:
    with pytest.raises(InvalidArgumentError) as e:
        validate.vm_name("y" * 100_000)
    assert len(e.value.message) < 300


def test_options_typed_readers() -> None:
    o = validate.Options({"force": ("b", True), "timeout_s": ("i", 30)}, "Shutdown")
    assert o.bool("force") is True
    assert o.uint("timeout_s", 60, minimum=1, maximum=3600) == 30
    assert o.str("missing", "dflt") == "dflt"
    o.done()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"force": ("s", "yes")}, "force"),
        ({"timeout_s": ("u", 0)}, "timeout_s"),
        ({"timeout_s": ("t", 2**40)}, "timeout_s"),
        ({"timeout_s": ("d", 1.5)}, "timeout_s"),
        ({"bogus": ("b", True)}, "bogus"),
    ],
)
def test_options_errors_name_the_key(raw: dict[str, tuple[str, object]], needle: str) -> None:
    o = validate.Options(raw, "Shutdown")
    with pytest.raises(InvalidArgumentError) as e:
        o.bool("force")
        o.uint("timeout_s", 60, minimum=1, maximum=3600)
        o.done()
    assert needle in e.value.message


def test_too_many_options() -> None:
    with pytest.raises(InvalidArgumentError):
        validate.Options({f"k{i}": ("b", True) for i in range(1000)}, "Start")
