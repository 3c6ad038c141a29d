#!/bin/bash
# The checks of `cargo xtask appliance-test` (issue 12), to run as root inside a Debian 12 VM
# booted with systemd as PID 1, with both packages built by `cargo xtask package` copied in.
# Not run on the development machine (no systemd there): the VM harness that boots it is the
# follow-up that runs this file. Each step prints `appliance: <step>: ok` or fails with why.
#
#   appliance-checks.sh install   OMA_DEB VMA_DEB   # both services active, READY, eBPF detector
#   appliance-checks.sh job       JOB_ID            # a job started through the OMA has its own unit
#   appliance-checks.sh restart   JOB_ID            # restart of the watchdog: the job runs on
#   appliance-checks.sh upgrade   JOB_ID VMA_DEB2   # upgrade to a higher version: the job runs on
#   appliance-checks.sh kill9     JOB_ID            # kill -9 of migratekit: failed/process_killed
#   appliance-checks.sh freeze                      # SIGSTOP of the watchdog: systemd restarts it
#   appliance-checks.sh purge                       # nothing of either package is left
set -euo pipefail

OMA_URL=${OMA_URL:-http://127.0.0.1:8082}
TOKEN_FILE=/etc/oma/operator.token

ok() { echo "appliance: $*: ok"; }
fail() { echo "appliance: FAILED: $*" >&2; exit 1; }

# Retries "$@" every second for up to $1 seconds.
within() {
    local secs=$1; shift
    for _ in $(seq "$secs"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    "$@"
}

job_field() { # JOB_ID FIELD
    job-recovery --oma-url "$OMA_URL" --token-file "$TOKEN_FILE" --json jobs \
        | python3 -c "import json,sys; j=[x for x in json.load(sys.stdin) if x['id']=='$1'][0]; print(j.get('$2') or '')"
}

migratekit_unit() { # JOB_ID: the transient unit migratekit runs in
    systemctl list-units --all --plain --no-legend "migratekit-$1-*" | awk '{print $1}' | head -1
}

migratekit_pid() { systemctl show -p MainPID --value "$(migratekit_unit "$1")"; }

status_text() { systemctl show -p StatusText --value "$1"; }

install_both() {
    apt-get install -y "$1" "$2"
    for unit in oma vma-watchdog; do
        [ "$(systemctl is-active "$unit")" = active ] || fail "$unit is not active"
        [ -n "$(status_text "$unit")" ] || fail "$unit sent no STATUS"
    done
    status_text vma-watchdog | grep -q '^detector ebpf;' || fail "the watchdog does not run on eBPF: $(status_text vma-watchdog)"
    status_text oma | grep -q '^database sqlite;' || fail "unexpected OMA status: $(status_text oma)"
    ok "install: both active, READY with their status, watchdog on eBPF"
}

job_has_unit() {
    local unit; unit=$(migratekit_unit "$1")
    [ -n "$unit" ] || fail "no migratekit-$1-* unit"
    systemctl status "$unit" >/dev/null || true
    [ "$(job_field "$1" status)" = replicating ] || fail "job $1 is not replicating"
    ok "job $1 runs in $unit"
}

# Job still replicating, its progress moving, and its migratekit the same process.
survives() { # JOB_ID WHAT PID_BEFORE BYTES_BEFORE
    local pid; pid=$(migratekit_pid "$1")
    [ "$pid" = "$3" ] || fail "$2: migratekit changed from pid $3 to $pid"
    within 60 test "$(job_field "$1" bytes_transferred)" -gt "$4" || fail "$2: progress stopped"
    [ "$(job_field "$1" status)" = replicating ] || fail "$2: job left replicating"
    # No signal reached it: SIGTERM and SIGKILL (what a unit's stop sends) would have ended it,
    # and its unit's journal would show the stop.
    ! journalctl -u "$(migratekit_unit "$1")" | grep -qE 'Stopping|Killing|Sent signal' || fail "$2: migratekit's unit was signalled"
    ok "$2: job $1 still replicating, progress moving, migratekit untouched"
}

restart_watchdog() {
    local pid bytes; pid=$(migratekit_pid "$1"); bytes=$(job_field "$1" bytes_transferred)
    systemctl restart vma-watchdog
    survives "$1" "restart" "$pid" "$bytes"
}

upgrade_watchdog() {
    local pid bytes; pid=$(migratekit_pid "$1"); bytes=$(job_field "$1" bytes_transferred)
    apt-get install -y "$2"
    survives "$1" "upgrade" "$pid" "$bytes"
}

kill9() {
    local pid; pid=$(migratekit_pid "$1")
    kill -9 "$pid"
    within 30 test "$(job_field "$1" status)" = failed || fail "job $1 not failed after kill -9"
    [ "$(job_field "$1" failure_class)" = process_killed ] || fail "job $1: not process_killed"
    journalctl -u vma-watchdog | grep '"process_exited"' | grep -q "\"pid\":$pid" || fail "no death line for $pid"
    ok "kill -9: job $1 failed/process_killed, death line in the watchdog's journal"
}

freeze() {
    local pid; pid=$(systemctl show -p MainPID --value vma-watchdog)
    kill -STOP "$pid"
    # WatchdogSec=30: systemd kills the frozen daemon (SIGABRT) and Restart=on-failure starts it.
    within 90 test "$(systemctl show -p MainPID --value vma-watchdog)" != "$pid" || fail "not restarted"
    within 60 test "$(systemctl is-active vma-watchdog)" = active || fail "not active after the restart"
    journalctl -u vma-watchdog | grep -q 'Watchdog timeout' || fail "no watchdog timeout in the journal"
    ok "freeze: systemd's watchdog restarted the frozen watchdog"
}

purge() {
    apt-get purge -y oma vma-watchdog
    for path in /etc/oma /etc/vma-watchdog /var/lib/oma /var/lib/vma-watchdog \
        /usr/lib/systemd/system/oma.service /usr/lib/systemd/system/vma-watchdog.service; do
        [ ! -e "$path" ] || fail "$path is left after purge"
    done
    ! getent passwd oma >/dev/null || fail "the oma user is left"
    ! systemctl list-unit-files oma.service vma-watchdog.service --no-legend | grep -q . || fail "a unit is left"
    ok "purge: no unit, user or state left"
}

case "${1:-}" in
    install) install_both "$2" "$3" ;;
    job) job_has_unit "$2" ;;
    restart) restart_watchdog "$2" ;;
    upgrade) upgrade_watchdog "$2" "$3" ;;
    kill9) kill9 "$2" ;;
    freeze) freeze ;;
    purge) purge ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
esac
