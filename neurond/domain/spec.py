"""CreateVM's spec as a typed model, the NeuronOS profiles, and the settings they resolve to.

The bus layer reads the ``a{sv}`` with typed readers (D-Bus types, unknown keys); this model
checks values (patterns, ranges, combinations) and names the bad key in InvalidArgumentError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from neurond.errors import InvalidArgumentError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PCI_RE = re.compile(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
RESOLUTION_RE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")
MAX_RESOLUTION = 16384
MAX_PATH = 4096
MAX_CMDLINE = 2048

ProfileName = Literal["windows11", "windows10", "linux", "generic"]


class VMSpec(BaseModel):
    """The keys of API.md's CreateVM spec; None means "the profile's default"."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str
    profile: ProfileName = "generic"
    vcpus: int | None = Field(None, ge=1, le=256)
    memory_mib: int | None = Field(None, ge=128, le=4 * 1024 * 1024)
    disk_gib: int | None = Field(None, ge=1, le=64 * 1024)
    iso: str = ""
    gpu: str = ""
    looking_glass: bool = False
    looking_glass_resolution: str = "1920x1080"
    uefi: bool | None = None
    secure_boot: bool | None = None
    tpm: bool | None = None
    autostart: bool = False
    kernel: str = ""
    initrd: str = ""
    cmdline: str = Field("", max_length=MAX_CMDLINE)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(
                "use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
            )
        return v

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v: str) -> str:
        if v and not PCI_RE.fullmatch(v):
            raise ValueError("write a PCI address as DDDD:BB:SS.F in hexadecimal")
        return v.lower()

    @field_validator("looking_glass_resolution")
    @classmethod
    def _resolution(cls, v: str) -> str:
        m = RESOLUTION_RE.fullmatch(v)
        if not m or max(int(m.group(1)), int(m.group(2))) > MAX_RESOLUTION:
            raise ValueError(f"write it as WxH, each at most {MAX_RESOLUTION}, e.g. 1920x1080")
        return v

    @field_validator("iso", "kernel", "initrd")
    @classmethod
    def _path(cls, v: str) -> str:
        if v and (not v.startswith("/") or len(v) > MAX_PATH or "\0" in v):
            raise ValueError("must be an absolute path")
        if v and ".." in v.split("/"):
            raise ValueError("must not contain '..'")
        return v

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, v: str) -> str:
        if any(not c.isprintable() for c in v):
            raise ValueError("must hold printable characters only")
        return v

    @property
    def resolution(self) -> tuple[int, int]:
        w, _, h = self.looking_glass_resolution.partition("x")
        return int(w), int(h)


# The D-Bus reading of each key: bool ← b, int ← any integer type that fits, str ← s.
KEY_TYPES: dict[str, type] = {
    "name": str,
    "profile": str,
    "vcpus": int,
    "memory_mib": int,
    "disk_gib": int,
    "iso": str,
    "gpu": str,
    "looking_glass": bool,
    "looking_glass_resolution": str,
    "uefi": bool,
    "secure_boot": bool,
    "tpm": bool,
    "autostart": bool,
    "kernel": str,
    "initrd": str,
    "cmdline": str,
}


def parse_spec(values: dict[str, Any]) -> VMSpec:
    """The spec from already type-checked values; a bad value is InvalidArgumentError."""
    try:
        return VMSpec.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else "spec"
        msg = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "missing":
            msg = "it is required"
        raise InvalidArgumentError(
            f"Invalid CreateVM spec key {key!r}: {msg}.", details={"option": key}
        ) from None


@dataclass(frozen=True)
class Profile:
    """A NeuronOS profile: defaults for what the spec leaves out, and what it requires."""

    name: str
    vcpus: int
    memory_mib: int
    disk_gib: int
    uefi: bool
    secure_boot: bool
    tpm: bool
    windows: bool
    required: tuple[str, ...] = ()  # spec keys that may not be turned off
    min_memory_mib: int = 128  # the OS's own minimum: CreateVM and SetMemory refuse less


PROFILES: dict[str, Profile] = {
    # Microsoft's minimums: Windows 11 4 GB of RAM, 64-bit Windows 10 2 GB.
    "windows11": Profile(
        "windows11", 4, 8192, 64, True, True, True, True, ("uefi", "secure_boot", "tpm"), 4096
    ),
    "windows10": Profile("windows10", 4, 4096, 64, True, False, False, True, (), 2048),
    "linux": Profile("linux", 2, 2048, 20, False, False, False, False),
    "generic": Profile("generic", 1, 1024, 10, False, False, False, False),
}


@dataclass(frozen=True)
class Settings:
    """What a VM gets: the spec over its profile's defaults, checked as a whole."""

    name: str
    profile: Profile
    vcpus: int
    memory_mib: int
    disk_gib: int
    uefi: bool
    secure_boot: bool
    tpm: bool
    iso: str
    gpu: str
    looking_glass: bool
    resolution: tuple[int, int]
    autostart: bool
    kernel: str
    initrd: str
    cmdline: str


def _bad(key: str, text: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"Invalid CreateVM spec key {key!r}: {text}.", details={"option": key}
    )


def resolve(spec: VMSpec) -> Settings:
    p = PROFILES[spec.profile]
    for key in p.required:
        if getattr(spec, key) is False:
            raise _bad(key, f"the {p.name} profile requires it")
    uefi = p.uefi if spec.uefi is None else spec.uefi
    secure_boot = (p.secure_boot and uefi) if spec.secure_boot is None else spec.secure_boot
    if secure_boot and not uefi:
        raise _bad("secure_boot", "secure boot needs UEFI (uefi true)")
    if (spec.initrd or spec.cmdline) and not spec.kernel:
        raise _bad("initrd" if spec.initrd else "cmdline", "needs a kernel")
    if spec.memory_mib is not None and spec.memory_mib < p.min_memory_mib:
        raise _bad("memory_mib", f"the {p.name} profile needs at least {p.min_memory_mib} MiB")
    return Settings(
        name=spec.name,
        profile=p,
        vcpus=spec.vcpus or p.vcpus,
        memory_mib=spec.memory_mib or p.memory_mib,
        disk_gib=spec.disk_gib or p.disk_gib,
        uefi=uefi,
        secure_boot=secure_boot,
        tpm=p.tpm if spec.tpm is None else spec.tpm,
        iso=spec.iso,
        gpu=spec.gpu,
        looking_glass=spec.looking_glass,
        resolution=spec.resolution,
        autostart=spec.autostart,
        kernel=spec.kernel,
        initrd=spec.initrd,
        cmdline=spec.cmdline,
    )


def looking_glass_mib(width: int, height: int) -> int:
    """API.md: next_pow2(W·H·4·2 / 1 MiB + 10) MiB, at least 32 (exact, in integers)."""
    need = width * height * 8 + 10 * 2**20  # bytes
    size = 1
    while size * 2**20 < need:
        size *= 2
    return max(size, 32)
