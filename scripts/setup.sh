#!/usr/bin/env bash
# Prepare this machine (Debian 12) for building and testing neurond: the Debian packages the
# tests start for real (TESTING.md), then .venv with the project installed editable.
# Idempotent and quick on a second run: apt only when a package is missing, pip only when
# pyproject.toml changed since the last install. Runs unattended (CI=true, no stdin).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(
    # TESTING.md's list
    dbus libvirt-daemon libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
    libvirt-dev qemu-system-x86 qemu-utils ovmf swtpm swtpm-tools libvirt-dbus libsystemd-dev
    pkg-config busybox-static cpio gcc python3-dev libdbus-1-dev libglib2.0-dev libglib2.0-bin
    polkitd
    # journald, busctl, systemd-analyze; unshare, setpriv, nsenter
    systemd util-linux
    # xmllint, which virt-xml-validate runs (tests/unit/test_domain.py checks domain XML)
    libxml2-utils
    # qdbus: Qt's own D-Bus client, as KDE frontends use it (tests/bus/test_qdbus.py)
    qdbus-qt5
    # `python3 -m venv` on Debian's own python3; make for the Makefile and .ci/run
    python3-venv make
)
VENV=.venv
STAMP=$VENV/.installed-stamp

say() { echo "setup: $*"; }

# --- Debian packages -------------------------------------------------------------------
# One dpkg-query for all: it prints the installed ones and complains about unknown ones.
installed=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${APT_PACKAGES[@]}" 2>/dev/null \
    | awk '$2 == "installed" { print $1 }' || true)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    grep -qxF "$pkg" <<<"$installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || { say "need root to install: ${missing[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    say "apt: installing ${#missing[@]} missing packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
else
    say "apt: all ${#APT_PACKAGES[@]} packages present"
fi

# --- Python virtual environment --------------------------------------------------------
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { say "python3 on PATH is older than 3.11: $(python3 --version)" >&2; exit 1; }
# A venv whose interpreter vanished (python upgraded, pyenv version removed) is rebuilt.
if ! "$VENV/bin/python" -c '' 2>/dev/null; then
    say "venv: creating $VENV with $(python3 --version) ($(command -v python3))"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
else
    say "venv: $VENV exists ($("$VENV/bin/python" --version))"
fi

if [[ ! -e $STAMP || pyproject.toml -nt $STAMP ]]; then
    say "pip: installing -e '.[test]' (libvirt-python and systemd-python compile, ~15 s)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]' </dev/null
    touch "$STAMP"
else
    say "pip: up to date (pyproject.toml unchanged since last install)"
fi
