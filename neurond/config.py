"""neurond's configuration: pydantic models loaded from TOML (API.md, Configuration).

Unknown keys and bad values fail with InvalidConfigError naming the field.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from neurond.errors import InvalidConfigError

DEFAULT_PATH = Path("/etc/neurond/neurond.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LibvirtConfig(_Section):
    domain_type: Literal["auto", "kvm", "qemu"] = "auto"
    network: str = ""


class StorageConfig(_Section):
    image_dir: Path = Path("/var/lib/neurond/images")
    state_dir: Path = Path("/var/lib/neurond/state")
    iso_roots: tuple[Path, ...] = (Path("/var/lib/neurond/images"), Path("/usr/share/virtio-win"))


class HardwareConfig(_Section):
    sysfs_root: Path = Path("/sys")
    procfs_root: Path = Path("/proc")


class DownloadsConfig(_Section):
    max_parallel: int = Field(2, ge=1, le=16)
    allow_insecure_loopback: bool = False
    ca_bundle: str = ""
    connect_timeout_s: float = Field(30, gt=0, le=600)
    idle_timeout_s: float = Field(60, gt=0, le=3600)  # no byte for this long: the link is dead
    max_retries: int = Field(5, ge=0, le=100)  # attempts in a row that bring no new byte


class TimeoutsConfig(_Section):
    call_s: float = Field(20, gt=0, le=20)
    shutdown_s: int = Field(60, ge=1, le=3600)
    guest_agent_s: float = Field(10, gt=0, le=20)
    stop_s: float = Field(20, gt=0, le=600)


class JobsConfig(_Section):
    linger_s: float = Field(300, ge=0, le=86400)


class AuthorizationConfig(_Section):
    polkit: bool = True


class LoggingConfig(_Section):
    target: Literal["auto", "journal", "console", "json"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class LimitsConfig(_Section):
    """Per-sender limits (API.md: a caller over them gets LimitExceeded)."""

    calls_per_sender: int = Field(64, ge=1, le=100000)
    jobs_per_sender: int = Field(16, ge=1, le=100000)


class Config(_Section):
    libvirt_uri: str = "qemu:///system"
    libvirt: LibvirtConfig = LibvirtConfig()
    storage: StorageConfig = StorageConfig()
    hardware: HardwareConfig = HardwareConfig()
    downloads: DownloadsConfig = DownloadsConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    jobs: JobsConfig = JobsConfig()
    authorization: AuthorizationConfig = AuthorizationConfig()
    logging: LoggingConfig = LoggingConfig()
    limits: LimitsConfig = LimitsConfig()


def _describe(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return field, f"unknown key {field!r}"
    return field, f"{field}: {first['msg']}"


def parse(
    data: dict[str, Any], overrides: dict[str, Any] | None = None, source: str = ""
) -> Config:
    """Build a Config from parsed TOML, with command-line overrides (top-level keys) applied."""
    merged = dict(data)
    merged.update(overrides or {})
    try:
        return Config.model_validate(merged)
    except ValidationError as e:
        field, text = _describe(e)
        where = f" in {source}" if source else ""
        raise InvalidConfigError(
            f"Invalid configuration{where}: {text}.", details={"field": field, "path": source}
        ) from None


def config_path(explicit: str | None) -> Path:
    """The file to read: the flag, else NEUROND_CONFIG, else the system default."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("NEUROND_CONFIG")
    return Path(env) if env else DEFAULT_PATH


def load(
    path: Path, overrides: dict[str, Any] | None = None, *, must_exist: bool = False
) -> Config:
    """Read and validate the TOML file; a missing default file means all defaults."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if must_exist:
            raise InvalidConfigError(
                f"The configuration file {path} does not exist.", details={"path": str(path)}
            ) from None
        return parse({}, overrides)
    except OSError as e:
        raise InvalidConfigError(
            f"The configuration file {path} cannot be read: {e.strerror}.",
            details={"path": str(path)},
        ) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InvalidConfigError(
            f"The configuration file {path} is not valid TOML: {e}.", details={"path": str(path)}
        ) from None
    return parse(data, overrides, str(path))
