#!/usr/bin/env bash
# A walk through neurond's D-Bus API with busctl, as a frontend author would do it by hand:
# a private system bus (tests/harness.py), neurond on libvirt's test driver (test:///default
# has one running domain, "test"), then the calls. Every command is echoed before it runs;
# any step that does not do what API.md promises ends the demo with a non-zero status.
# NEUROND=/path/to/neurond runs the demo against another build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=.venv/bin/python
NEUROND=${NEUROND:-.venv/bin/neurond}
NAME=org.neuronos.Neuron1
MANAGER=/org/neuronos/Neuron1/Manager
MIF=org.neuronos.Neuron1.Manager
VIF=org.neuronos.Neuron1.VM

work=$(mktemp -d /tmp/neurond-demo-XXXXXX)
bus_pid=
daemon_pid=

# Stop a process we started: SIGTERM, then SIGKILL if it is still there after $2 seconds.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < $2 * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    [[ -n $daemon_pid ]] && stop_pid "$daemon_pid" 20
    [[ -n $bus_pid ]] && stop_pid "$bus_pid" 5
    if ((rc != 0)) && [[ -s $work/neurond.log ]]; then
        echo "--- neurond's log:" >&2
        cat "$work/neurond.log" >&2
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { echo "demo: FAILED: $*" >&2; exit 1; }

# Echo a command the way one would type it, then run it.
show() {
    local words=() a
    for a in "$@"; do
        if [[ $a =~ ^[][A-Za-z0-9_./:=@+-]+$ ]]; then words+=("$a"); else words+=("'$a'"); fi
    done
    echo
    echo "\$ ${words[*]}"
}
run() { show "$@"; "$@" || fail "$1 exited with $?"; }

# Poll a VM's State until it is $2: state changes may arrive through libvirt events.
expect_state() {
    local vm=$1 want=$2 got i
    show busctl --system get-property "$NAME" "$vm" "$VIF" State
    for ((i = 0; i < 50; i++)); do
        got=$(busctl --system get-property "$NAME" "$vm" "$VIF" State) || fail "get-property"
        [[ $got == "s \"$want\"" ]] && break
        sleep 0.1
    done
    echo "$got"
    [[ $got == "s \"$want\"" ]] || fail "State is $got, expected $want"
}

echo "== private system bus"
"$PY" -m tests.harness bus >"$work/bus.env" &
bus_pid=$!
for ((i = 0; i < 100; i++)); do
    grep -q '^DBUS_SYSTEM_BUS_ADDRESS=' "$work/bus.env" && break
    kill -0 "$bus_pid" 2>/dev/null || fail "the private bus did not start"
    sleep 0.1
done
export "$(grep '^DBUS_SYSTEM_BUS_ADDRESS=' "$work/bus.env")" || fail "no bus address"
echo "$(head -n1 "$work/bus.env")"

echo "== neurond"
mkdir -p "$work/images" "$work/state"
cat >"$work/neurond.toml" <<EOF
[storage]
image_dir = "$work/images"
state_dir = "$work/state"

[authorization]
polkit = false
EOF
show "$NEUROND" --system --libvirt-uri test:///default --config "$work/neurond.toml" \
    --log-target console
"$NEUROND" --system --libvirt-uri test:///default --config "$work/neurond.toml" \
    --log-target console 2>"$work/neurond.log" &
daemon_pid=$!
for ((i = 0; i < 200; i++)); do
    [[ $(busctl --system call org.freedesktop.DBus /org/freedesktop/DBus \
        org.freedesktop.DBus NameHasOwner s "$NAME" 2>/dev/null) == "b true" ]] && break
    kill -0 "$daemon_pid" 2>/dev/null || fail "neurond exited before owning $NAME"
    sleep 0.1
done
((i < 200)) || fail "neurond did not own $NAME within 20 s"
echo "neurond owns $NAME"

echo
echo "== the manager"
run busctl --system call "$NAME" "$MANAGER" "$MIF" ListVMs

show busctl --system call "$NAME" "$MANAGER" "$MIF" GetVM s test
reply=$(busctl --system call "$NAME" "$MANAGER" "$MIF" GetVM s test) || fail "GetVM test"
echo "$reply"
vm=${reply#o }
vm=${vm//\"/}
[[ $vm == /org/neuronos/Neuron1/vm/* ]] || fail "GetVM returned $reply"

echo
echo "== the VM object"
run busctl --system introspect "$NAME" "$vm"

run busctl --system call "$NAME" "$vm" "$VIF" Pause
expect_state "$vm" paused
run busctl --system call "$NAME" "$vm" "$VIF" Resume
expect_state "$vm" running
run busctl --system call "$NAME" "$vm" "$VIF" ForceOff
expect_state "$vm" shutoff
run busctl --system call "$NAME" "$vm" "$VIF" Start 'a{sv}' 0
expect_state "$vm" running

echo
echo "== errors: busctl prints only the message, gdbus also the error name"
show busctl --system call "$NAME" "$MANAGER" "$MIF" GetVM s nosuchvm
if busctl --system call "$NAME" "$MANAGER" "$MIF" GetVM s nosuchvm 2>&1; then
    fail "GetVM nosuchvm succeeded"
fi
show gdbus call --system --dest "$NAME" --object-path "$MANAGER" --method "$MIF.GetVM" nosuchvm
if gdbus call --system --dest "$NAME" --object-path "$MANAGER" --method "$MIF.GetVM" nosuchvm \
    2>"$work/gdbus.err"; then
    fail "GetVM nosuchvm succeeded"
fi
cat "$work/gdbus.err"
error=$(sed -n 's/^Error: GDBus\.Error:\([^:]*\):.*/\1/p' "$work/gdbus.err")
[[ $error == org.neuronos.Neuron1.Error.VMNotFound ]] || fail "error name is '$error'"

show busctl --system --json=short call "$NAME" "$MANAGER" "$MIF" ListErrors
busctl --system --json=short call "$NAME" "$MANAGER" "$MIF" ListErrors >"$work/errors.json" \
    || fail "ListErrors"
"$PY" - "$work/errors.json" "$error" <<'EOF' || fail "$error is not in ListErrors"
import json, sys
rows = json.load(open(sys.argv[1]))["data"][0]
print(f"ListErrors has {len(rows)} errors; the one GetVM gave:")
for name, code, recoverable, number in rows:
    if name == sys.argv[2]:
        print(f"  {name}: code {code}, recoverable {str(recoverable).lower()}, number {number}")
        sys.exit(0)
sys.exit(1)
EOF

echo
echo "demo: all steps OK"
