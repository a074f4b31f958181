"""One-line documentation of every exported member (org.gtk.GDBus.DocString), from API.md.

gdbus-codegen turns these into the generated client's documentation; docs/api.md shows them.
"""

from __future__ import annotations

DOCS: dict[str, str] = {
    "Manager": "neurond's entry point: the VM list, VM creation, downloads, jobs and errors.",
    "Manager.ListVMs": "(name, uuid, object path, state) of every defined VM, sorted by name.",
    "Manager.GetVM": "The object path of the VM with this name or UUID; VMNotFound if none.",
    "Manager.CreateVM": "Check the spec and the host, then create the VM as a create-vm job; "
    "the VM object exists (state creating) when the reply arrives.",
    "Manager.DownloadImage": "Download a file over HTTPS into the image directory as a "
    "download job; options: sha256 (required), filename, size.",
    "Manager.ListJobs": "Jobs still known to the daemon (running, or finished and lingering).",
    "Manager.ListErrors": "(D-Bus error name, code, recoverable, number) of every error.",
    "Manager.ListImages": "The files in the image directory: name s, size t, sha256 s (when a "
    "download verified it), used_by ao (VMs referring to the file). APIVersion 3.",
    "Manager.DeleteImage": "Delete a file of the image directory by name; refused (InvalidState) "
    "while a VM refers to it or a download writes it. APIVersion 3.",
    "Manager.APIVersion": "Grows with every addition to the API.",
    "Manager.Version": "The daemon's version.",
    "Manager.LibvirtURI": "The libvirt connection URI, e.g. qemu:///system.",
    "Manager.Connected": "Whether the libvirt connection is up.",
    "Manager.Features": "Optional features available now (looking-glass, spice, vnc, "
    "guest-agent, gpu-passthrough, tpm, uefi, secure-boot).",
    "Hardware": "GPU passthrough readiness of this host, read from sysfs and procfs.",
    "Hardware.GetIOMMUStatus": "enabled, groups, cpu_vendor, virtualization and the kernel "
    "parameter to add when the IOMMU is off.",
    "Hardware.ListGPUs": "Every GPU with its IDs, driver, IOMMU group and passthrough readiness.",
    "Hardware.CheckPassthrough": "ready, reasons (blockers) and warnings for the GPU at this "
    "PCI address.",
    "VM": "One libvirt domain; its path is its UUID and survives a rename.",
    "VM.Start": "Start the VM (option paused b).",
    "VM.Shutdown": "Ask the guest to power off (ACPI); the shutdown-vm job ends when it is off. "
    "Options timeout_s u, force b.",
    "VM.ForceOff": "Power the VM off at once; a running Shutdown job ends cancelled.",
    "VM.Reboot": "Ask the guest to reboot.",
    "VM.Reset": "Reset the VM like a reset button.",
    "VM.Pause": "Pause the VM's CPUs.",
    "VM.Resume": "Resume a paused VM.",
    "VM.SetAutostart": "Start the VM when the host boots.",
    "VM.Delete": "Delete the VM as a delete-vm job (options delete_storage b, force b).",
    "VM.GetDisplay": "The best display: Looking Glass, SPICE, VNC or none, with fallback_reason.",
    "VM.GuestPing": "Whether the QEMU guest agent answers.",
    "VM.GuestInfo": "os, kernel, hostname and agent_version from the guest agent.",
    "VM.GuestExec": "Run a program in the guest; exit code and raw stdout/stderr bytes.",
    "VM.Rename": "Rename a shut-off VM (names as at creation); the path stays. APIVersion 2.",
    "VM.SetMemory": "Set the memory in MiB (at least 128, or the profile's minimum: Windows 11 "
    "4096, Windows 10 2048; at most the host's RAM) in the persistent definition, as maximum and "
    "current; option live b also balloons the running VM, down or up to the maximum it booted "
    "with (above it NotSupported, nothing changed). APIVersion 2.",
    "VM.SetVCPUs": "Set the vCPUs (1 to the host's CPUs) in the persistent definition, as maximum "
    "and current; option live b also hot-plugs on the running VM up to the maximum it booted "
    "with (above it NotSupported, nothing changed). APIVersion 2.",
    "VM.ChangeMedia": "Insert an ISO (a file under an ISO root) into the first CD-ROM: live and "
    "persistent on a running or paused VM, persistent when shut off. APIVersion 3.",
    "VM.EjectMedia": "Empty the first CD-ROM: live and persistent on a running or paused VM, "
    "persistent when shut off. APIVersion 3.",
    "VM.Media": "The file in the first CD-ROM drive, empty when it is empty or there is none. "
    "APIVersion 3.",
    "VM.Name": "The VM's name.",
    "VM.UUID": "The VM's UUID.",
    "VM.State": "creating, shutoff, starting, running, paused, stopping, crashed, pmsuspended, "
    "deleting or unknown.",
    "VM.StateReason": "libvirt's reason for the state (booted, user, destroyed, shutdown, ...) "
    "or the method that caused neurond's own state.",
    "VM.Persistent": "Whether the domain is defined persistently.",
    "VM.Autostart": "Whether the VM starts with the host (change it with SetAutostart).",
    "VM.VCPUs": "Virtual CPUs.",
    "VM.MemoryMiB": "Configured (maximum) memory in MiB.",
    "VM.GPUAddress": "The passed-through GPU's PCI address, empty if none.",
    "VM.LookingGlass": "Whether the VM has a Looking Glass IVSHMEM device.",
    "VM.GuestAgent": "connected, disconnected or none (no agent channel).",
    "VM.Owner": "The uid that created the VM (CreateVM's caller); 0 when it was defined "
    "outside neurond. polkit gets it as detail owner. APIVersion 3.",
    "Job": "A long operation with progress; it lingers for a while after it ends.",
    "Job.Cancel": "Cancel the job (another user's job needs cancel-job-other-user).",
    "Job.Completed": "The job ended: success, the error name and message when it did not.",
    "Job.Operation": "create-vm, delete-vm, shutdown-vm or download.",
    "Job.State": "queued, running, completed, failed or cancelled.",
    "Job.Progress": "0 to 1; exactly 1 once completed.",
    "Job.ProgressValid": "Whether Progress means anything yet.",
    "Job.Bytes": "Bytes done.",
    "Job.TotalBytes": "Bytes in all, 0 when unknown.",
    "Job.Rate": "Bytes per second.",
    "Job.StartTime": "When the job started, in microseconds since the epoch.",
    "Job.Cancelable": "Whether Cancel can still stop it.",
    "Job.Objects": "The VMs the job works on.",
    "Job.StartedByUID": "The uid of the caller that started the job.",
    "Job.ErrorName": "The full D-Bus error name when failed or cancelled, else empty.",
    "Job.ErrorMessage": "The error's message when failed or cancelled, else empty.",
}
