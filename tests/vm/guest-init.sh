#!/bin/bash
# Stage 2 of the kill-test VM (`cargo xtask kill-test --vm`): pid 1 inside Debian 12's
# root file system, on Debian 12's 6.1 cloud kernel. It mounts what the eBPF detector and
# the harness need, runs the checks the host asked for in /vm/env, prints one
# `VMTEST:<key>:<value>` line per finding for the host to parse, and powers off. Every step
# runs under `timeout`, so the guest always reaches the power-off line.

set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
export RUST_BACKTRACE=1
# shellcheck source=/dev/null
. /vm/env

power_off() {
    echo "VMTEST:done"
    sync
    echo o > /proc/sysrq-trigger
    sleep 10
}
trap power_off EXIT

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
# The memory controller as a cgroup v1 hierarchy, where both the detector's OOM test and the
# harness look for it (the harness also takes cgroup v2, the detector test does not).
mount -t tmpfs cgroup /sys/fs/cgroup
mkdir -p /sys/fs/cgroup/memory
mount -t cgroup -o memory memory /sys/fs/cgroup/memory
echo 1 > /proc/sys/kernel/sysrq
hostname vmtest
ip link set lo up
# The partition scenario needs veth; the cloud kernel has it as a module. /vm/modules/order
# lists it after what it depends on (from the modules' own `depends=`).
while read -r m; do
    insmod "/vm/modules/$m.ko" || echo "VMTEST:fatal:insmod $m failed"
done </vm/modules/order

# The detector tests were compiled with the host's absolute path of ebpf-test-child
# (CARGO_BIN_EXE_*), so that path must lead to the payload's binaries here too.
mkdir -p "$(dirname "$HOST_PROFILE_DIR")"
ln -sfn /vm/bin "$HOST_PROFILE_DIR"
export SYSTEM_TESTS_BIN_DIR=/vm/bin

# A fresh line: the firmware's last output on the console has no newline.
echo
echo "VMTEST:kernel:$(uname -r)"
echo "VMTEST:cpus:$(nproc)"
FORMAT=/sys/kernel/tracing/events/sched/sched_process_exit/format
if [ ! -r "$FORMAT" ]; then
    echo "VMTEST:group_dead:unknown (no $FORMAT)"
elif grep -q ' group_dead;' "$FORMAT"; then
    echo "VMTEST:group_dead:present"
else
    echo "VMTEST:group_dead:absent"
fi
sed 's/^/vm-format| /' "$FORMAT" 2>/dev/null
if [ -r /sys/kernel/btf/vmlinux ]; then
    echo "VMTEST:btf:present ($(stat -c %s /sys/kernel/btf/vmlinux) bytes)"
else
    echo "VMTEST:btf:absent"
fi

# Step 1: the daemon itself, eBPF detector required, until it logs which death path it chose.
step_watchdog() {
    local log=/tmp/watchdog-probe.log
    /vm/bin/vma-watchdog --state-dir /tmp/watchdog-probe --detector ebpf \
        --listen 127.0.0.1:18081 >"$log" 2>&1 &
    local pid=$! i=0
    while [ "$i" -lt "$WATCHDOG_TIMEOUT" ]; do
        grep -q 'deaths decided by' "$log" && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
        i=$((i + 1))
    done
    kill -TERM "$pid" 2>/dev/null
    wait "$pid"
    # Without colours (tracing writes ANSI escapes), so the host gets plain text.
    sed -i 's/\x1b\[[0-9;]*m//g' "$log"
    sed 's/^/vm-watchdog| /' "$log"
    local line
    line=$(grep -o 'deaths decided by [^=]*' "$log" | head -n1 | sed 's/ [a-z_]*$//')
    if [ -n "$line" ]; then
        echo "VMTEST:exit_mode:${line#deaths decided by }"
        return 0
    fi
    echo "VMTEST:exit_mode:none (the eBPF detector did not attach; log above)"
    return 1
}

# Step 2: the eBPF detector's privileged tests, both death paths. One thread keeps the
# libtest lines whole for the host's parser.
step_detector_tests() {
    timeout --kill-after=10 "$DETECTOR_TIMEOUT" "/vm/bin/$DETECTOR_TEST" \
        --test-threads=1 --nocapture 2>&1 | sed 's/^/vm-detector| /'
    return "${PIPESTATUS[0]}"
}

# Step 3: kill-test scenarios of the whole system (all of them when KILL_TEST_ONLY is empty).
step_kill_test() {
    cd /tmp || return 1
    local only=()
    [ -n "$KILL_TEST_ONLY" ] && only=(--only "$KILL_TEST_ONLY")
    timeout --kill-after=10 "$KILL_TEST_TIMEOUT" /vm/bin/kill-test \
        --runs "$KILL_TEST_RUNS" "${only[@]}" --json /tmp/kill-test.json 2>&1 |
        sed 's/^/vm-kill-test| /'
    local rc=${PIPESTATUS[0]}
    if [ -r /tmp/kill-test.json ]; then
        echo "VMTEST:report-json-begin"
        cat /tmp/kill-test.json
        echo
        echo "VMTEST:report-json-end"
    fi
    return "$rc"
}

for step in watchdog detector_tests kill_test; do
    start=$(date +%s)
    "step_$step"
    rc=$?
    echo "VMTEST:step:$step:rc=$rc:seconds=$(($(date +%s) - start))"
done
