#!/bin/busybox sh
# Stage 1 of the kill-test VM (`cargo xtask kill-test --vm`), run by busybox from the initramfs.
# Debian's cloud kernel has virtio-blk as modules, and no initramfs comes with it, so this
# loads the modules the two disks need, mounts the root file system (vda) and the payload of
# test binaries (vdb), and hands over to the payload's guest-init.sh. Any failure powers off
# at once with a VMTEST:fatal marker, so the host never waits for its time-out in vain.

/bin/busybox --install -s /bin
export PATH=/bin

fatal() {
    echo "VMTEST:fatal:initramfs: $*"
    echo o > /proc/sysrq-trigger
    sleep 5
    exit 1
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 1 > /proc/sys/kernel/sysrq

# /modules/order lists the modules each after those its `depends=` names (the host read them
# from the kernel package's .ko files, so the order follows the kernel booted).
[ -s /modules/order ] || fatal "the initramfs has no /modules/order"
while read -r m; do
    insmod "/modules/$m.ko" || fatal "insmod $m failed (order: $(tr '\n' ' ' </modules/order))"
done </modules/order

# The disks appear asynchronously after the driver binds; wait up to 30 s (TCG is slow).
i=0
while [ ! -b /dev/vdb ]; do
    i=$((i + 1))
    [ "$i" -gt 300 ] && fatal "no /dev/vda and /dev/vdb after 30 s (ls /dev: $(ls /dev | tr '\n' ' '))"
    sleep 0.1
done

mount -t ext4 /dev/vda /newroot || fatal "mounting the root file system /dev/vda"
mkdir -p /newroot/vm
mount -t ext4 -o ro /dev/vdb /newroot/vm || fatal "mounting the payload /dev/vdb"
[ -x /newroot/vm/guest-init.sh ] || fatal "the payload has no executable guest-init.sh"

umount /proc /sys
mount --move /dev /newroot/dev || fatal "moving /dev into the new root"
exec switch_root /newroot /vm/guest-init.sh
