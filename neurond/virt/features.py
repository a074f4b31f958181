"""The availability checks of the optional features that depend on libvirt, QEMU or the host.

- ``guest-agent``: ``libvirt_qemu`` imports and the connection is to the QEMU driver (only
  it has ``qemuAgentCommand``; the test driver has not).
- ``spice``, ``vnc``: the QEMU driver's domain capabilities list the graphics type (one
  ``getDomainCapabilities`` call per refresh: it reflects QEMU's modules, e.g. Debian ships
  SPICE as a loadable module that may be missing).
- ``looking-glass``: a ``looking-glass-client`` binary is on PATH.
"""

from __future__ import annotations

import importlib.util
import shutil
import xml.etree.ElementTree as ET
from typing import Protocol

from neurond.core.features import Feature
from neurond.errors import OperationFailedError

LOOKING_GLASS_CLIENT = "looking-glass-client"


class CapabilitySource(Protocol):
    async def driver_type(self) -> str: ...

    async def domain_capabilities(self) -> str: ...


def graphics_types(xml: str) -> set[str]:
    """The graphics types a domain capabilities document says QEMU supports."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise OperationFailedError(f"libvirt returned domain capabilities XML: {e}.") from e
    graphics = root.find("./devices/graphics")
    if graphics is None or graphics.get("supported") != "yes":
        return set()
    return {v.text or "" for v in graphics.iterfind("./enum[@name='type']/value")}


def libvirt_features(source: CapabilitySource) -> list[Feature]:
    cache: dict[str, set[str]] = {}

    async def is_qemu() -> bool:
        return (await source.driver_type()).upper() == "QEMU"

    async def agent() -> bool:
        return importlib.util.find_spec("libvirt_qemu") is not None and await is_qemu()

    async def graphics() -> set[str]:
        # spice is checked first on each refresh, vnc reuses its answer
        if not await is_qemu():
            return set()
        cache["types"] = graphics_types(await source.domain_capabilities())
        return cache["types"]

    async def spice() -> bool:
        return "spice" in await graphics()

    async def vnc() -> bool:
        types = cache.pop("types", None)
        return "vnc" in (types if types is not None else await graphics())

    return [Feature("spice", spice), Feature("vnc", vnc), Feature("guest-agent", agent)]


async def _looking_glass_client() -> bool:
    return shutil.which(LOOKING_GLASS_CLIENT) is not None


def host_features() -> list[Feature]:
    return [Feature("looking-glass", _looking_glass_client)]
