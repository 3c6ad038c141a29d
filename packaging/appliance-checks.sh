#!/bin/bash
# The checks of `cargo xtask appliance-test` (issue 12), run as root inside a Debian 12 VM booted
# with systemd as PID 1 (by appliance-test.service, see appliance-guest-init.sh). /vm holds the
# packages (debs/oma_*.deb, debs/vma-watchdog_<v1>_*.deb and the higher debs/upgrade/), the
# stand-in migratekit (bin/migratekit) and this file. Each check prints
# `VMTEST:check:<name>:ok` or `VMTEST:check:<name>:FAILED: <why>` for the host to parse; `all`
# runs them in order and powers the VM off.
#
#   appliance-checks.sh all
set -uo pipefail

OMA_URL=http://127.0.0.1:8082
JOB1=job-appliance-1
JOB2=job-appliance-2
JOB3=job-appliance-3
# Kept across the reboot: what the jobs looked like before it.
STATE=/var/lib/appliance-test

fail() { echo "appliance: FAILED: $*" >&2; exit 1; }
note() { echo "appliance: $*"; }

# Retries "$@" every second for up to $1 seconds.
within() {
    local secs=$1; shift
    for _ in $(seq "$secs"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    "$@"
}

# A field of a job, from the OMA's API.
job_field() { # JOB_ID FIELD
    curl -sf -H "Authorization: Bearer $(head -n1 /etc/oma/operator.token)" \
        "$OMA_URL/api/v1/jobs/$1" | jq -r ".$2 // empty"
}
job_is() { [ "$(job_field "$1" status)" = "$2" ]; }
bytes_above() { [ "$(job_field "$1" bytes_transferred)" -gt "$2" ]; }

# The transient service the job's migratekit runs in (the newest, for a job started again).
migratekit_unit() {
    systemctl list-units --all --plain --no-legend "migratekit-$1-*.service" | awk '{print $1}' | tail -n1
}
main_pid() { systemctl show -p MainPID --value "$1"; }
status_text() { systemctl show -p StatusText --value "$1"; }
# For `within`, which runs a command again and again (a "$(...)" in its arguments would be
# read once, before the first try).
is_active() { [ "$(systemctl is-active "$1")" = active ]; }
has_status() { [ -n "$(status_text "$1")" ]; }
pid_changed() { [ "$(main_pid "$1")" != "$2" ]; }
start_time() { awk '{sub(/.*\) /, ""); print $20}' "/proc/$1/stat"; }
journal() { journalctl -q -o cat -u "$1"; }

check_install() {
    dpkg -i /vm/debs/oma_*.deb /vm/debs/vma-watchdog_*.deb || fail "dpkg -i of both packages"
    for unit in oma vma-watchdog; do
        within 60 is_active "$unit" || fail "$unit is $(systemctl is-active "$unit")"
        # Type=notify: active means READY=1 arrived.
        [ "$(systemctl show -p Type --value "$unit")" = notify ] || fail "$unit is not Type=notify"
        within 10 has_status "$unit" || fail "$unit sent no STATUS"
        note "$unit: $(status_text "$unit")"
    done
    status_text vma-watchdog | grep -q '^detector ebpf;' || fail "the watchdog is not on eBPF: $(status_text vma-watchdog)"
    status_text oma | grep -q '^database sqlite;' || fail "unexpected OMA status: $(status_text oma)"
    journal vma-watchdog | grep '"launcher_selected"' | grep -q '"launcher":"systemd_service"' \
        || fail "the watchdog does not launch into systemd units: $(journal vma-watchdog | grep launcher_selected)"
}

check_configure() {
    install -m 0755 /vm/bin/migratekit /usr/local/bin/migratekit
    install -m 0600 /etc/oma/vma-api.token /etc/vma-watchdog/api.token
    job-recovery --oma-url "$OMA_URL" --token-file /etc/oma/operator.token register-vma vma-1 \
        --base-url http://127.0.0.1:8081 --vma-token-file /etc/vma-watchdog/oma.token \
        || fail "registering the VMA"
    cat > /etc/vma-watchdog/launch.json <<'JSON'
{ "program": "/usr/local/bin/migratekit",
  "args": ["migrate", "--job-id", "{job_id}", "--standin-threads", "2",
           "--standin-total-bytes", "100000000000", "--standin-rate", "20000000",
           "--standin-progress-interval-ms", "1000"] }
JSON
    cat >> /etc/default/vma-watchdog <<'ENV'
VMA_WATCHDOG_OMA_URL=http://127.0.0.1:8082
VMA_WATCHDOG_VMA_ID=vma-1
VMA_WATCHDOG_LAUNCH_CONFIG=/etc/vma-watchdog/launch.json
ENV
    systemctl restart vma-watchdog || fail "restarting the watchdog after configuring it"
    within 30 sh -c 'journalctl -q -o cat -u vma-watchdog | grep -q "\"delivery_started\""' \
        || fail "the watchdog does not deliver to the OMA"
}

start_job() { # JOB_ID
    job-recovery --oma-url "$OMA_URL" --token-file /etc/oma/operator.token create \
        --vm-context "ctx-$1" --vm-name "vm-$1" --vma vma-1 --id "$1" >/dev/null \
        || fail "creating job $1"
    within 60 job_is "$1" replicating || fail "job $1 is $(job_field "$1" status), not replicating"
}

check_job_unit() {
    start_job "$JOB1"
    local unit pid; unit=$(migratekit_unit "$JOB1")
    [ -n "$unit" ] || fail "no migratekit-$JOB1-* unit"
    pid=$(main_pid "$unit")
    [ "$pid" = "$(job_field "$JOB1" pid)" ] || fail "$unit's MainPID $pid is not the job's pid $(job_field "$JOB1" pid)"
    [ "$(readlink "/proc/$pid/exe")" = /usr/local/bin/migratekit ] || fail "$unit runs $(readlink "/proc/$pid/exe")"
    grep -q "/$unit\$" "/proc/$pid/cgroup" || fail "pid $pid is not in $unit's cgroup: $(cat "/proc/$pid/cgroup")"
    # Not the watchdog's sandbox: no NoNewPrivileges, no seccomp filter, every capability.
    grep -q '^NoNewPrivs:[[:space:]]*0$' "/proc/$pid/status" || fail "migratekit has NoNewPrivileges"
    grep -q '^Seccomp:[[:space:]]*0$' "/proc/$pid/status" || fail "migratekit has a seccomp filter"
    [ "$(grep '^CapBnd:' "/proc/$pid/status")" = "$(grep '^CapBnd:' /proc/1/status)" ] || fail "migratekit's capability bounding set is reduced"
    # The unit's command line is the gate, never migratekit's arguments.
    systemctl show -p ExecStart --value "$unit" | grep -q migratekit-gate || fail "$unit does not run the gate"
    within 30 bytes_above "$JOB1" 0 || fail "no progress from job $JOB1"
    note "job $JOB1 runs as pid $pid in $unit ($(systemctl show -p ExecMainStartTimestamp --value "$unit"))"
}

# The job still replicating as the same process, its progress moving, and no stop of its unit.
survives() { # WHAT PID START_TIME BYTES
    local unit; unit=$(migratekit_unit "$JOB1")
    [ -d "/proc/$2" ] && [ "$(start_time "$2")" = "$3" ] || fail "$1: migratekit (pid $2) is gone"
    [ "$(main_pid "$unit")" = "$2" ] || fail "$1: $unit now runs $(main_pid "$unit")"
    within 60 bytes_above "$JOB1" "$4" || fail "$1: progress stopped at $(job_field "$JOB1" bytes_transferred)"
    job_is "$JOB1" replicating || fail "$1: the job is $(job_field "$JOB1" status)"
    # A terminating signal would have ended it (it handles none); a stop of its unit would be
    # in its journal.
    ! journalctl -q -u "$unit" | grep -qE 'Stopping|Killing|Sent signal' || fail "$1: $unit was stopped"
    note "$1: job $JOB1 replicating at $(job_field "$JOB1" bytes_transferred) bytes, same pid $2"
}

check_restart() {
    local pid; pid=$(job_field "$JOB1" pid)
    local st bytes; st=$(start_time "$pid"); bytes=$(job_field "$JOB1" bytes_transferred)
    systemctl restart vma-watchdog || fail "systemctl restart vma-watchdog"
    within 60 is_active vma-watchdog || fail "not active after the restart"
    survives restart "$pid" "$st" "$bytes"
}

check_upgrade() {
    local pid; pid=$(job_field "$JOB1" pid)
    local st bytes; st=$(start_time "$pid"); bytes=$(job_field "$JOB1" bytes_transferred)
    local before; before=$(dpkg-query -W -f '${Version}' vma-watchdog)
    dpkg -i /vm/debs/upgrade/vma-watchdog_*.deb || fail "dpkg -i of the upgrade"
    local after; after=$(dpkg-query -W -f '${Version}' vma-watchdog)
    dpkg --compare-versions "$after" gt "$before" || fail "version $after is not above $before"
    within 60 is_active vma-watchdog || fail "not active after the upgrade"
    note "upgraded vma-watchdog $before -> $after"
    survives upgrade "$pid" "$st" "$bytes"
}

check_kill9() {
    local pid; pid=$(job_field "$JOB1" pid)
    kill -9 "$pid"
    within 60 job_is "$JOB1" failed || fail "job $JOB1 is $(job_field "$JOB1" status) after kill -9"
    [ "$(job_field "$JOB1" failure_class)" = process_killed ] || fail "job $JOB1: $(job_field "$JOB1" failure_class), not process_killed"
    journal vma-watchdog | grep '"process_exited"' | grep -q "\"pid\":$pid[,}]" || fail "no death line for pid $pid"
}

check_freeze() {
    start_job "$JOB2"
    local pid watchdog; pid=$(job_field "$JOB2" pid); watchdog=$(main_pid vma-watchdog)
    kill -STOP "$watchdog"
    kill -9 "$pid"
    # WatchdogSec=30: systemd aborts the frozen daemon and Restart=on-failure starts it again.
    within 120 pid_changed vma-watchdog "$watchdog" || fail "the frozen watchdog was not restarted"
    within 60 is_active vma-watchdog || fail "not active after the restart"
    journalctl -q -u vma-watchdog | grep -q 'Watchdog timeout' || fail "no watchdog timeout in the journal"
    within 60 job_is "$JOB2" failed || fail "job $JOB2 is $(job_field "$JOB2" status) after its death during the freeze"
    local deaths; deaths=$(curl -sf -H "Authorization: Bearer $(head -n1 /etc/oma/operator.token)" \
        "$OMA_URL/api/v1/jobs/$JOB2/audit" | jq '[.. | objects | select(.to_status? == "failed" and .from_status != "failed")] | length')
    [ "$deaths" = 1 ] || fail "job $JOB2 has $deaths transitions to failed in its audit"
    note "job $JOB2: $(job_field "$JOB2" failure_class), reported once"
}

audit() { # JOB_ID: its audit entries, as JSON
    curl -sf -H "Authorization: Bearer $(head -n1 /etc/oma/operator.token)" "$OMA_URL/api/v1/jobs/$1/audit"
}
# The jobs' statuses and the sizes of their audit trails, one job a line.
jobs_digest() {
    for job in "$JOB1" "$JOB2"; do
        echo "$job $(job_field "$job" status) $(audit "$job" | jq '[.. | objects | select(has("to_status"))] | length')"
    done
}

# A third job runs; the VM is reset (the checks carry on in the second boot, check_reboot).
check_before_reboot() {
    start_job "$JOB3"
    within 30 bytes_above "$JOB3" 0 || fail "no progress from job $JOB3"
    mkdir -p "$STATE"
    jobs_digest > "$STATE/digest"
    echo "$(job_field "$JOB3" pid)" > "$STATE/pid"
}

check_reboot() {
    for unit in oma vma-watchdog; do
        within 120 is_active "$unit" || fail "$unit is $(systemctl is-active "$unit") after the reboot"
    done
    within 120 job_is "$JOB3" failed || fail "job $JOB3 is $(job_field "$JOB3" status) after the reboot"
    [ "$(job_field "$JOB3" failure_class)" = died_while_unwatched ] || fail "job $JOB3: $(job_field "$JOB3" failure_class), not died_while_unwatched"
    # Given time to report it twice, had it a reason to.
    sleep 10
    local deaths; deaths=$(audit "$JOB3" | jq '[.. | objects | select(.to_status? == "failed")] | length')
    [ "$deaths" = 1 ] || fail "job $JOB3 has $deaths transitions to failed in its audit"
    [ "$(jobs_digest)" = "$(cat "$STATE/digest")" ] || fail "other jobs changed: $(jobs_digest) (before: $(cat "$STATE/digest"))"
    [ -z "$(migratekit_unit "$JOB3")" ] || fail "job $JOB3 still has a unit"
    note "job $JOB3 (pid $(cat "$STATE/pid") before the reboot): died_while_unwatched once; jobs $JOB1 and $JOB2 unchanged"
}

check_purge() {
    dpkg --purge oma vma-watchdog || fail "dpkg --purge"
    # dpkg removes what the packages made; a file the operator added is theirs to keep.
    [ "$(ls -A /etc/vma-watchdog)" = launch.json ] || fail "/etc/vma-watchdog holds $(ls -A /etc/vma-watchdog)"
    rm /etc/vma-watchdog/launch.json && rmdir /etc/vma-watchdog
    for path in /etc/oma /etc/vma-watchdog /var/lib/oma /var/lib/vma-watchdog /etc/default/oma \
        /etc/default/vma-watchdog /usr/lib/systemd/system/oma.service \
        /usr/lib/systemd/system/vma-watchdog.service /usr/libexec/vma-watchdog /usr/libexec/oma; do
        [ ! -e "$path" ] || fail "$path is left after purge"
    done
    ! getent passwd oma >/dev/null || fail "the oma user is left"
    ! getent group oma >/dev/null || fail "the oma group is left"
    for unit in oma vma-watchdog; do
        [ "$(systemctl show -p LoadState --value "$unit")" = not-found ] || fail "$unit.service is still known to systemd"
    done
}

dump_journals() {
    for unit in vma-watchdog oma 'migratekit-*'; do
        echo "appliance: the last lines of journalctl -u $unit:"
        journalctl -q -o cat -n 40 -u "$unit" | cut -c1-400 | sed 's/^/appliance-journal| /'
    done
}

# Runs one check in a subshell and prints its verdict; returns its status.
check() { # NAME
    local started=$SECONDS
    if ( set -e; "check_$1" ); then
        echo "VMTEST:check:$1:ok ($((SECONDS - started)) s)"
    else
        echo "VMTEST:check:$1:FAILED ($((SECONDS - started)) s)"
        return 1
    fi
}

all() {
    if [ -f "$STATE/rebooted" ]; then
        echo
        echo "VMTEST:boot:2 ($(cat /proc/sys/kernel/random/boot_id))"
        local failed=
        check reboot || failed=1
        check purge || failed=1
        [ -z "$failed" ] || dump_journals
        return 0
    fi
    echo
    echo "VMTEST:kernel:$(uname -r)"
    echo "VMTEST:pid1:$(cat /proc/1/comm)"
    echo "VMTEST:systemd:$(systemctl --version | head -n1)"
    # Nothing makes sense without the packages; the job checks need the job.
    local failed=
    if check install && check configure; then
        if check job_unit; then
            check restart || failed=1
            check upgrade || failed=1
            check kill9 || failed=1
        else
            failed=1
        fi
        check freeze || failed=1
        if [ -z "$failed" ] && check before_reboot; then
            touch "$STATE/rebooted"
            sync
            echo "VMTEST:reboot:job $JOB3 runs as pid $(cat "$STATE/pid"); hard reset"
            # A hard reset (power cut, host crash): migratekit dies with the machine and
            # nothing sees it. A clean `systemctl reboot` stops migratekit's unit while the
            # watchdog still runs, which then reports what it saw (SIGTERM: process_killed).
            # The pause lets the marker above leave the serial port before the reset.
            sleep 3
            echo b > /proc/sysrq-trigger
            return 3
        fi
        failed=1
    else
        failed=1
    fi
    check purge || failed=1
    [ -z "$failed" ] || dump_journals
    echo "VMTEST:failed-units:$(systemctl list-units --failed --plain --no-legend | awk '{print $1}' | tr '\n' ' ')"
}

case "${1:-}" in
    all)
        all
        # 3: rebooting, the second boot carries on.
        [ $? = 3 ] && sleep infinity
        echo "VMTEST:done"
        systemctl --no-block poweroff
        ;;
    *) sed -n '2,9p' "$0"; exit 2 ;;
esac
