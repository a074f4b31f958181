#!/usr/bin/env python3
"""Write docs/api.md from dbus/org.neuronos.Neuron1.xml (tests fail when it is stale).

Usage: scripts/gen-api-doc.py [--check]
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
XML = REPO / "dbus" / "org.neuronos.Neuron1.xml"
DOC = REPO / "docs" / "api.md"


def _args(el: ET.Element, direction: str) -> str:
    return ", ".join(
        f"{a.get('type')} {a.get('name')}"
        for a in el.iter("arg")
        if a.get("direction", "in" if el.tag == "method" else "out") == direction
    )


def _doc(el: ET.Element) -> str:
    for ann in el.findall("annotation"):
        if ann.get("name") == "org.gtk.GDBus.DocString":
            return " ".join((ann.get("value") or "").split())
    return ""


def render() -> str:
    root = ET.parse(XML).getroot()
    out = [
        "# neurond D-Bus interfaces",
        "",
        "Generated from `dbus/org.neuronos.Neuron1.xml` by `scripts/gen-api-doc.py`; do not edit.",
        "The contract, with semantics, errors and authorization, is the project's API.md.",
    ]
    for iface in root.iter("interface"):
        out += ["", f"## {iface.get('name')}", ""]
        if (doc := _doc(iface)):
            out += [doc, ""]
        out += ["| member | signature | notes |", "|---|---|---|"]
        for m in iface.findall("method"):
            sig = f"({_args(m, 'in')}) → ({_args(m, 'out')})"
            out.append(f"| `{m.get('name')}` | `{sig}` | {_doc(m)} |")
        for p in iface.findall("property"):
            out.append(f"| property `{p.get('name')}` | `{p.get('type')}` ({p.get('access')}) "
                       f"| {_doc(p)} |")
        for s in iface.findall("signal"):
            out.append(f"| signal `{s.get('name')}` | `({_args(s, 'out')})` | {_doc(s)} |")
    return "\n".join(out) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not DOC.exists() or DOC.read_text() != text:
            print("docs/api.md is stale: run scripts/gen-api-doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
