"""journald MESSAGE_IDs of the events an administrator looks for (systemd/neurond.catalog).

``journalctl -x`` shows the catalog text beside these entries; ``journalctl MESSAGE_ID=…``
finds every occurrence. The IDs are fixed forever.
"""

from __future__ import annotations

VM_STARTED = "066d63eb5e074d1bb5b4f7e8ebd9fb20"
VM_STOPPED = "ff6a9a278fc444b0bd34620a358a7faf"
VM_CRASHED = "806dc886eba6475484bfdc613e75a83e"
VM_CREATED = "49649057de4849e4b21fcf7105597052"
VM_DELETED = "64dd26a1dc634837b01869b49b250aab"
LIBVIRT_LOST = "6e97ac9c9e0b43dfb1864d14c54b1767"
LIBVIRT_RESTORED = "df3629914815483f8fda26f42c077918"
AUTHORIZATION_DENIED = "4d4223c6ec8e4bbdaf4c83538eea25f7"
# A create rolled back or a delete rolled forward at start, from a killed neurond's record.
RECOVERED = "90eb6bfceae0435bb558dc1b78306fc8"

ALL = {
    "VM_STARTED": VM_STARTED,
    "VM_STOPPED": VM_STOPPED,
    "VM_CRASHED": VM_CRASHED,
    "VM_CREATED": VM_CREATED,
    "VM_DELETED": VM_DELETED,
    "LIBVIRT_LOST": LIBVIRT_LOST,
    "LIBVIRT_RESTORED": LIBVIRT_RESTORED,
    "AUTHORIZATION_DENIED": AUTHORIZATION_DENIED,
    "RECOVERED": RECOVERED,
}
