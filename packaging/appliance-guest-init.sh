#!/bin/bash
# Stage 2 of `cargo xtask appliance-test`, run by the initramfs (`tests/vm/initramfs-init.sh`)
# as /vm/guest-init.sh: it adds one unit to the VM's throw-away root file system (a qemu
# snapshot), the one that runs packaging/appliance-checks.sh once the system is up, and then
# hands PID 1 to systemd. Everything else is Debian 12 as debootstrap left it.
set -eu

cat > /etc/systemd/system/appliance-test.service <<'UNIT'
[Unit]
Description=cargo xtask appliance-test checks
# After the boot is complete, so both packages are installed on a settled system.
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/vm/appliance-checks.sh all
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
# The checks power off themselves; this is for a script that died half way.
ExecStopPost=/bin/systemctl --no-block poweroff
UNIT
mkdir -p /etc/systemd/system/multi-user.target.wants
ln -sf /etc/systemd/system/appliance-test.service /etc/systemd/system/multi-user.target.wants/
# The console is the checks' own: no login prompt on it.
ln -sf /dev/null /etc/systemd/system/serial-getty@ttyS0.service
echo vmappliance > /etc/hostname
# debootstrap writes no /etc/hosts; an installed system has one, and migratekit posts its
# progress to http://localhost:8081.
grep -qs '^127.0.0.1[[:space:]].*localhost' /etc/hosts ||
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >> /etc/hosts
exec /lib/systemd/systemd
