#!/usr/bin/env bash
# Build the tiny real guest of the integration tests (TESTING.md, "libvirt"), once:
#
#   scripts/build-guest.sh [OUTDIR]      (default /var/cache/neurond-tests/guest)
#
# OUTDIR/vmlinuz           Debian's kernel, the one the linux-image-amd64 metapackage depends on
# OUTDIR/initrd-agent.img  busybox-static init + the virtio/evdev/ACPI-button modules + a watcher
#                          that runs `poweroff -f` on the ACPI power button + Debian's qemu-ga
#                          (with the shared libraries `ldd` finds) on org.qemu.guest_agent.0;
#                          virtio_balloon too, so that a domain with <memballoon model='virtio'>
#                          honours live memory changes (libvirt's live <currentMemory> follows
#                          QEMU's BALLOON_CHANGE events, which need the guest's driver)
# OUTDIR/initrd-plain.img  the same without the guest agent
#
# Kernel command line words the init understands (besides console=ttyS0):
#   nrd.acpi=ignore   no power-button watcher: the guest ignores ACPI shutdown requests
#   nrd.agent=off     do not start qemu-ga even if the initrd has it
# The guest writes "NRDTEST-READY acpi=watch|ignore agent=on|off|none" on its console once the
# watcher (and the agent) run, and "NRDTEST-POWERBUTTON" when the button was pressed.
#
# Cached: nothing is done when OUTDIR holds the outputs and a stamp with this script's hash, so
# a change of the recipe rebuilds. Needs root-free apt-get download (or root), dpkg-deb, cpio,
# gzip, busybox-static and the shared libraries of qemu-ga on this host (qemu-system-x86 brings
# them). Takes about 10 s, most of it downloading and unpacking the kernel package.
set -euo pipefail

OUTDIR=${1:-/var/cache/neurond-tests/guest}
SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
RECIPE_HASH=$(sha256sum "$SCRIPT" | cut -d' ' -f1)
STAMP=$OUTDIR/.stamp
OUTPUTS=(vmlinuz initrd-agent.img initrd-plain.img)
# Modules the guest loads; their dependencies are added from each module's `depends=`.
WANTED_MODULES=(virtio_pci virtio_console virtio_balloon evdev button)

say() { echo "build-guest: $*" >&2; }
die() { say "error: $*"; exit 1; }

is_built() {
    [[ -f $STAMP && $(cat "$STAMP") == "$RECIPE_HASH" ]] || return 1
    local f
    for f in "${OUTPUTS[@]}"; do [[ -s $OUTDIR/$f ]] || return 1; done
}

mkdir -p "$OUTDIR"
chmod 0755 "$OUTDIR"
if is_built; then
    say "up to date in $OUTDIR"
    exit 0
fi
# One builder at a time; a second one waits and then finds the outputs.
exec 9>"$OUTDIR/.lock"
flock 9
if is_built; then
    say "up to date in $OUTDIR (built meanwhile)"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb cpio gzip ldd flock; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
BUSYBOX=/bin/busybox
[[ -x $BUSYBOX ]] || die "$BUSYBOX is missing (apt-get install busybox-static)"
ldd "$BUSYBOX" >/dev/null 2>&1 && die "$BUSYBOX is dynamically linked; install busybox-static"

started=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/neurond-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
chmod 0755 "$WORK"

apt_opts=(-q)
((EUID == 0)) && apt_opts+=(-o APT::Sandbox::User=root)  # no "_apt cannot access" warning

kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-amd64$/ { print $2; exit }'
}

# --- download ------------------------------------------------------------------------------
KPKG=$(kernel_package || true)
if [[ -z $KPKG ]]; then
    say "no package lists (or no linux-image-amd64 in them): apt-get update"
    apt-get update -qq
    KPKG=$(kernel_package) || true
    [[ -n $KPKG ]] || die "linux-image-amd64 depends on no linux-image-*-amd64 package"
fi
say "kernel package: $KPKG"
download() {
    (cd "$WORK" && apt-get "${apt_opts[@]}" download "$@" >/dev/null)
}
if ! download "$KPKG" qemu-guest-agent; then
    say "apt-get download failed; updating the package lists and trying again"
    apt-get update -qq
    download "$KPKG" qemu-guest-agent || die "cannot download $KPKG and qemu-guest-agent"
fi
dpkg-deb -x "$WORK/$KPKG"_*.deb "$WORK/kernel"
dpkg-deb -x "$WORK"/qemu-guest-agent_*.deb "$WORK/qga"

# --- kernel and modules --------------------------------------------------------------------
vmlinuz=$(find "$WORK/kernel/boot" -name 'vmlinuz-*' | head -n1)
[[ -n $vmlinuz ]] || die "no vmlinuz in $KPKG"
kver=${vmlinuz##*/vmlinuz-}
moddir=$WORK/kernel/lib/modules/$kver
[[ -d $moddir ]] || die "no /lib/modules/$kver in $KPKG"
say "kernel $kver"

# name (with - or _) → path of its .ko / .ko.xz / .ko.zst in the package
module_file() {
    local pat=${1//[-_]/[-_]}
    find "$moddir/kernel" -regextype posix-extended \
        -regex ".*/${pat}\.ko(\.xz|\.zst|\.gz)?" | head -n1
}
is_builtin() {
    local name=${1//-/_}
    grep -Eq "/${name//_/[-_]}\.ko\$" "$moddir/modules.builtin" 2>/dev/null
}
# Uncompressed copy in $WORK/ko/NAME.ko: busybox insmod loads plain ELF only.
unpack_module() {
    local src=$1 dst=$2
    case $src in
        *.xz) xz -dc "$src" >"$dst" ;;
        *.zst) zstd -qdc "$src" >"$dst" ;;
        *.gz) gzip -dc "$src" >"$dst" ;;
        *) cp "$src" "$dst" ;;
    esac
}
mkdir -p "$WORK/ko"
declare -A seen=()
load_order=()
add_module() {  # depth first, so dependencies come before the module that needs them
    local name=${1//-/_} file deps dep
    [[ -n ${seen[$name]:-} ]] && return 0
    seen[$name]=1
    if is_builtin "$name"; then
        say "module $name: built in"
        return 0
    fi
    file=$(module_file "$name")
    [[ -n $file ]] || die "module $name is neither built in nor shipped in $KPKG"
    unpack_module "$file" "$WORK/ko/$name.ko"
    # The .modinfo section holds NUL-separated key=value strings, among them depends=a,b.
    deps=$(tr '\0' '\n' <"$WORK/ko/$name.ko" | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do add_module "$dep"; done
    load_order+=("$name")
}
for m in "${WANTED_MODULES[@]}"; do add_module "$m"; done
say "modules (load order): ${load_order[*]}"

# --- initramfs -----------------------------------------------------------------------------
make_root() {  # make_root DIR WITH_AGENT
    local root=$1 agent=$2 m lib
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,var,lib/modules}
    ln -s ../run "$root/var/run"
    cp "$BUSYBOX" "$root/bin/busybox"
    for m in "${load_order[@]}"; do cp "$WORK/ko/$m.ko" "$root/lib/modules/"; done
    printf '%s\n' "${load_order[@]}" >"$root/etc/modules"
    cat >"$root/etc/os-release" <<'EOF'
NAME="neurond test guest"
ID=nrdtest
PRETTY_NAME="neurond test guest (busybox)"
EOF
    echo nrdtest >"$root/etc/hostname"
    if [[ $agent == yes ]]; then
        cp "$WORK/qga/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
        # Every library ldd resolves (the loader included), at the path the binary asks for.
        local missing
        missing=$(ldd "$root/usr/sbin/qemu-ga" | awk '/not found/ { print $1 }')
        [[ -z $missing ]] || die "shared libraries of qemu-ga missing on this host: $missing"
        for lib in $(ldd "$root/usr/sbin/qemu-ga" | grep -o '/[^ ]*'); do
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    fi
    cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run/qga
hostname "$(cat /etc/hostname)"
for m in $(cat /etc/modules); do
    insmod "/lib/modules/$m.ko" || echo "NRDTEST-ERROR insmod $m"
done

acpi=watch
agent=none
[ -x /usr/sbin/qemu-ga ] && agent=on
for word in $(cat /proc/cmdline); do
    case $word in
        nrd.acpi=ignore) acpi=ignore ;;
        nrd.agent=off) [ "$agent" = on ] && agent=off ;;
    esac
done

# The ACPI power button is an input device; its first event (the press) powers off. The device
# is opened here, before READY is printed, and the watcher inherits it: a press that came
# between READY and a watcher's own open would be lost.
if [ "$acpi" = watch ]; then
    fd=3
    for ev in /sys/class/input/event*; do
        case "$(cat "$ev/device/name" 2>/dev/null)" in
            *"Power Button"*)
                eval "exec $fd</dev/input/${ev##*/}"
                # The line goes through printk, which writes the console synchronously: an
                # echo to the tty could still sit in the UART's buffer at the power-off.
                (dd of=/dev/null bs=24 count=1 2>/dev/null <&$fd
                 echo "<1>NRDTEST-POWERBUTTON" >/dev/kmsg
                 poweroff -f) &
                eval "exec $fd<&-"
                fd=$((fd + 1)) ;;
        esac
    done
    [ "$fd" -gt 3 ] || echo "NRDTEST-ERROR no power button input device"
fi

if [ "$agent" = on ]; then
    port=
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
    done
    if [ -n "$port" ]; then
        qemu-ga -m virtio-serial -p "$port" -t /run/qga -f /run/qga.pid &
    else
        agent=no-channel
    fi
fi

echo "NRDTEST-READY acpi=$acpi agent=$agent"
while true; do sleep 3600; done
EOF
    chmod 0755 "$root/init"
}
make_initrd() {  # make_initrd DIR OUT
    (cd "$1" && find . -print0 | LC_ALL=C sort -z \
        | cpio --null -o -H newc --quiet --owner=0:0) | gzip -6 -n >"$2"
}

make_root "$WORK/root-agent" yes
make_root "$WORK/root-plain" no
make_initrd "$WORK/root-agent" "$WORK/initrd-agent.img"
make_initrd "$WORK/root-plain" "$WORK/initrd-plain.img"
cp "$vmlinuz" "$WORK/vmlinuz"

# --- install -------------------------------------------------------------------------------
rm -f "$STAMP"
for f in "${OUTPUTS[@]}"; do
    install -m 0644 "$WORK/$f" "$OUTDIR/$f.new"
    mv -f "$OUTDIR/$f.new" "$OUTDIR/$f"
done
{
    echo "kernel_package=$KPKG"
    echo "kernel=$kver"
    echo "qemu_guest_agent=$(dpkg-deb -f "$WORK"/qemu-guest-agent_*.deb Version)"
    echo "modules=${load_order[*]}"
} >"$OUTDIR/manifest"
chmod 0644 "$OUTDIR/manifest"
echo "$RECIPE_HASH" >"$STAMP"
say "built in $((SECONDS - started)) s: $(cd "$OUTDIR" && du -h "${OUTPUTS[@]}" | tr '\t\n' ': ')"
