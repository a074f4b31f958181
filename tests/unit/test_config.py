"""Configuration: defaults, TOML, overrides, and InvalidConfig naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from neurond import config
from neurond.errors import InvalidConfigError


def test_defaults_match_the_contract() -> None:
    c = config.parse({})
    assert c.libvirt_uri == "qemu:///system"
    assert c.timeouts.call_s == 20 and c.timeouts.shutdown_s == 60 and c.timeouts.stop_s == 20
    assert c.jobs.linger_s == 300 and c.authorization.polkit is True
    assert c.storage.image_dir == Path("/var/lib/neurond/images")
    assert c.downloads.allow_insecure_loopback is False


def test_file_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "n.toml"
    f.write_text('libvirt_uri = "test:///default"\n[timeouts]\ncall_s = 5\n')
    c = config.load(f, {"libvirt_uri": "qemu:///session"})
    assert c.libvirt_uri == "qemu:///session" and c.timeouts.call_s == 5


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("bogus = 1\n", "bogus"),
        ("[timeouts]\ncall_s = 30\n", "timeouts.call_s"),
        ("[timeouts]\nwhat = 1\n", "timeouts.what"),
        ('[logging]\ntarget = "syslog"\n', "logging.target"),
        ('[jobs]\nlinger_s = "long"\n', "jobs.linger_s"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    f = tmp_path / "n.toml"
    f.write_text(text)
    with pytest.raises(InvalidConfigError) as e:
        config.load(f)
    assert e.value.details["field"] == field
    assert field in e.value.message


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "n.toml"
    f.write_text("[[[")
    with pytest.raises(InvalidConfigError, match="not valid TOML"):
        config.load(f)
    assert config.load(tmp_path / "absent.toml").libvirt_uri == "qemu:///system"
    with pytest.raises(InvalidConfigError, match="does not exist"):
        config.load(tmp_path / "absent.toml", must_exist=True)


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEUROND_CONFIG", "/tmp/env.toml")
    assert config.config_path("/tmp/flag.toml") == Path("/tmp/flag.toml")
    assert config.config_path(None) == Path("/tmp/env.toml")
    monkeypatch.delenv("NEUROND_CONFIG")
    assert config.config_path(None) == config.DEFAULT_PATH
