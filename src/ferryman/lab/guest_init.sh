#!/bin/busybox sh
# Ferryman lab guest: PID 1 of a busybox initramfs.
#
# It gives a migration something real to carry and something to check afterwards:
#   * memory that is dirtied continuously with non-zero data (zero pages would be nearly free to migrate),
#     plus the VM's canary string held in RAM;
#   * numbered records in a raw records area of the virtio disk (no filesystem): record N is sector N of the area,
#     sector 0 of it is a header holding the last number written, so a restarted guest continues at last+1 with no
#     gap. The area is the first MBR partition of type 0xda when the disk has one (the bootable disk image,
#     ferryman.lab.disk_image), else the whole of /dev/vda (a bare disk, with the kernel booted directly);
#   * "FMACK N" on the serial console, printed only after record N has been flushed to the disk.
#
# Parameters: vm=<id> canary=<string> dirty_kib=<KiB dirtied per second, default 256>
# interval_ms=<record interval, default 1000> resident_mib=<MiB of RAM filled with non-zero data at boot, default 0:
# a working set to migrate>. They come from the SMBIOS system serial number
# "ferryman:vm=<id>;canary=<c>;..." (QEMU -smbios type=1,serial=...), which lets every VM boot the same disk image,
# and from the kernel command line as ferryman.vm=<id> ferryman.canary=<c> ...; the command line wins where both
# set one. SMBIOS values must be tokens of [A-Za-z0-9._:@+-]; others are ignored.
#
# Network: the NIC at index i of the VM's spec is eth<i> here (virtio-net, in PCI order). The words ip<i>=<IPv4>,
# plen<i>=<prefix length> and, for IPv6, ip6_<i>=<IPv6>, plen6_<i>=<prefix length> give it static addresses; the init
# waits up to 3 s for eth<i>, brings lo and eth<i> up, adds the addresses and prints "FERRYMAN-NET eth<i> <mac>
# <address>/<plen>" per address. A VM without such words touches no network device and waits for none.
# It must stay cheap: several of these guests share two host cores under TCG.

/bin/busybox mkdir -p /proc /sys /dev /run /tmp
/bin/busybox --install -s /bin
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run

# Dependency order: virtio needs symbols from virtio_ring.
# ferryman.lab.guest.MODULES lists the same names in the same order.
for module in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net \
    virtio_blk virtio_console; do
    case "$module" in
        # only with a virtio-net device (virtio id 1; virtio_pci has registered every device by now), so that a VM
        # without a NIC boots as fast as before
        failover | net_failover | virtio_net) grep -qsx 0x0001 /sys/bus/virtio/devices/*/device || continue ;;
    esac
    insmod "/lib/modules/$module.ko" || echo "FERRYMAN-GUEST-ERROR insmod $module"
done

# qemu-guest-agent on its virtio-serial port, when the VM has one (an image that declares a guest agent): the host
# pings it to see the guest's own userland answer after a migration.
start_guest_agent() {
    [ -x /usr/sbin/qemu-ga ] || return 0
    grep -qsx 0x0003 /sys/bus/virtio/devices/*/device || return 0 # no virtio console device: no agent port
    i=0
    while [ $i -lt 30 ]; do
        for port in /sys/class/virtio-ports/*; do
            [ -r "$port/name" ] || continue
            if [ "$(cat "$port/name")" = org.qemu.guest_agent.0 ]; then
                mkdir -p /run/qga
                LD_LIBRARY_PATH=/lib/x86_64-linux-gnu /usr/sbin/qemu-ga -m virtio-serial -p "/dev/${port##*/}" \
                    -t /run/qga -f /run/qga/qga.pid -d && echo "FERRYMAN-GUEST-AGENT ${port##*/}"
                return 0
            fi
        done
        usleep 100000
        i=$((i + 1))
    done
}

VM=unknown
CANARY=none
DIRTY_KIB=256
INTERVAL_MS=1000
RESIDENT_MIB=0
set_param() {
    case "$1" in
        vm=*) VM="${1#*=}" ;;
        canary=*) CANARY="${1#*=}" ;;
        dirty_kib=*) DIRTY_KIB="${1#*=}" ;;
        interval_ms=*) INTERVAL_MS="${1#*=}" ;;
        resident_mib=*) RESIDENT_MIB="${1#*=}" ;;
        ip* | plen*) set_net_param "$1" ;;
    esac
}
# Network words go to NET_IP_<i>, NET_PLEN_<i>, NET_IP6_<i>, NET_PLEN6_<i>; NET_COUNT is one past the highest index.
# The index is checked to be 0-99 before it becomes part of a variable name; the value is only ever assigned.
NET_COUNT=0
set_net_param() {
    net_key="${1%%=*}"
    net_value="${1#*=}"
    case "$net_key" in
        ip6_*) net_kind=IP6 net_index="${net_key#ip6_}" ;;
        plen6_*) net_kind=PLEN6 net_index="${net_key#plen6_}" ;;
        ip*) net_kind=IP net_index="${net_key#ip}" ;;
        plen*) net_kind=PLEN net_index="${net_key#plen}" ;;
        *) return 0 ;;
    esac
    case "$net_index" in [0-9] | [1-9][0-9]) ;; *) return 0 ;; esac
    eval "NET_${net_kind}_${net_index}=\$net_value"
    [ "$net_index" -lt "$NET_COUNT" ] || NET_COUNT=$((net_index + 1))
}
# SMBIOS first, then the kernel command line, so the command line wins where both set a parameter.
SERIAL=
[ -r /sys/class/dmi/id/product_serial ] && read -r SERIAL < /sys/class/dmi/id/product_serial
case "$SERIAL" in
    ferryman:*)
        set -f
        IFS=';'
        for pair in ${SERIAL#ferryman:}; do
            case "${pair#*=}" in '' | *[!A-Za-z0-9._:@+-]*) continue ;; esac
            set_param "$pair"
        done
        unset IFS
        set +f
        ;;
esac
read -r CMDLINE < /proc/cmdline
for word in $CMDLINE; do
    case "$word" in
        ferryman.*) set_param "${word#ferryman.}" ;;
    esac
done
case "$DIRTY_KIB" in '' | *[!0-9]*) DIRTY_KIB=256 ;; esac
case "$INTERVAL_MS" in '' | *[!0-9]*) INTERVAL_MS=1000 ;; esac
case "$RESIDENT_MIB" in '' | *[!0-9]*) RESIDENT_MIB=0 ;; esac

# One address on a NIC: $1 device, $2 mac, $3 "" or "-6", $4 address, $5 prefix length.
add_address() {
    [ -n "$4" ] || return 0
    case "$5" in
        [0-9] | [0-9][0-9] | 1[0-2][0-9]) ;;
        *)
            echo "FERRYMAN-GUEST-ERROR $1: bad prefix length '$5' for $4"
            return 0
            ;;
    esac
    if ip $3 addr add "$4/$5" dev "$1"; then
        echo "FERRYMAN-NET $1 $2 $4/$5"
    else
        echo "FERRYMAN-GUEST-ERROR $1: ip $3 addr add $4/$5 failed"
    fi
}

# The NIC at index $1 is eth$1; its device appears a few 100 ms after virtio_net is loaded.
configure_nic() {
    eval "nic_ip=\${NET_IP_$1-} nic_plen=\${NET_PLEN_$1-} nic_ip6=\${NET_IP6_$1-} nic_plen6=\${NET_PLEN6_$1-}"
    [ -n "$nic_ip$nic_ip6" ] || return 0
    nic_dev="eth$1"
    w=0
    while [ ! -e "/sys/class/net/$nic_dev" ] && [ $w -lt 30 ]; do
        usleep 100000
        w=$((w + 1))
    done
    if [ ! -e "/sys/class/net/$nic_dev" ]; then
        echo "FERRYMAN-GUEST-ERROR no $nic_dev"
        return 0
    fi
    ip link set "$nic_dev" up || echo "FERRYMAN-GUEST-ERROR ip link set $nic_dev up failed"
    read -r nic_mac < "/sys/class/net/$nic_dev/address"
    add_address "$nic_dev" "$nic_mac" "" "$nic_ip" "$nic_plen"
    add_address "$nic_dev" "$nic_mac" -6 "$nic_ip6" "$nic_plen6"
}

configure_network() {
    [ "$NET_COUNT" -gt 0 ] || return 0
    ip link set lo up
    n=0
    while [ $n -lt "$NET_COUNT" ]; do
        configure_nic $n
        n=$((n + 1))
    done
}
configure_network

# The canary lives in RAM (tmpfs pages) so that a memory image of this guest contains it.
i=0
while [ $i -lt 64 ]; do
    echo "FERRYMAN-CANARY vm=$VM canary=$CANARY"
    i=$((i + 1))
done > /run/canary

# Random source twice the largest single write, so the source offset can always move.
BUF_KIB=2048
PIECE_KIB=1024
dd if=/dev/urandom of=/run/random bs=1024 count=$BUF_KIB 2>/dev/null

# The resident set: RESIDENT_MIB of tmpfs pages holding non-zero bytes, like a workload's heap and caches. They are
# written once, so a migration carries them in its first pass. The first piece repeats one random MiB and the others
# copy it, which keeps the fill fast under TCG; QEMU sends repeated pages in full (only zero pages are cheap).
fill_resident() {
    [ "$RESIDENT_MIB" -gt 0 ] || return 0
    mkdir -p /resident
    mount -t tmpfs -o size=$((RESIDENT_MIB + 1))m,mode=0700 tmpfs /resident
    first=$RESIDENT_MIB
    [ "$first" -le 64 ] || first=64
    k=0
    while [ $k -lt "$first" ]; do
        head -c 1048576 /run/random
        k=$((k + 1))
    done > /resident/fill0
    left=$((RESIDENT_MIB - first))
    n=1
    while [ "$left" -gt 0 ]; do
        mib=$left
        [ "$mib" -le 64 ] || mib=64
        head -c $((mib * 1048576)) /resident/fill0 > "/resident/fill$n"
        left=$((left - mib))
        n=$((n + 1))
    done
    echo "FERRYMAN-GUEST-RESIDENT mib=$RESIDENT_MIB"
}
fill_resident

# Rewrites a tmpfs area with random bytes, a quarter of the per-second budget every 250 ms. The area is at least
# one second's worth of writes, so a second dirties that many distinct pages.
dirty_loop() {
    tick_kib=$((DIRTY_KIB / 4))
    [ "$tick_kib" -gt 0 ] || return 0
    area_kib=$DIRTY_KIB
    [ "$area_kib" -ge 8192 ] || area_kib=8192
    [ "$area_kib" -le 32768 ] || area_kib=32768
    done_kib=0
    while [ $done_kib -lt $area_kib ]; do
        dd if=/run/random of=/run/dirty bs=1024 count=$PIECE_KIB seek=$done_kib conv=notrunc 2>/dev/null
        done_kib=$((done_kib + PIECE_KIB))
    done
    pos=0
    ticks=0
    while :; do
        ticks=$((ticks + 1))
        left=$tick_kib
        while [ "$left" -gt 0 ]; do
            n=$left
            [ "$n" -le $PIECE_KIB ] || n=$PIECE_KIB
            [ $((pos + n)) -le "$area_kib" ] || n=$((area_kib - pos))
            # The source offset moves every tick, so each pass over the area writes different bytes to a page.
            skip=$(((pos + ticks) % (BUF_KIB - n + 1)))
            dd if=/run/random of=/run/dirty bs=1024 count=$n skip=$skip seek=$pos conv=notrunc 2>/dev/null
            pos=$(((pos + n) % area_kib))
            left=$((left - n))
        done
        usleep 250000
    done
}

# The records area: the first partition of MBR type 0xda if the disk has an MBR naming one, else the whole disk.
# ferryman.lab.records finds it the same way when it reads the records.
records_device() {
    # bytes 446..511: four 16-byte entries (type at +4, first sector at +8, sector count at +12), then 55 aa
    set -- $(dd if=/dev/vda bs=2 skip=223 count=33 2>/dev/null | od -An -v -tx1)
    if [ $# -eq 66 ] && [ "${65}" = 55 ] && [ "${66}" = aa ]; then
        for n in 1 2 3 4; do
            if [ "$5" = da ] && [ "$9${10}${11}${12}" != 00000000 ] && [ "${13}${14}${15}${16}" != 00000000 ]; then
                echo "/dev/vda$n"
                return
            fi
            shift 16
        done
    fi
    echo /dev/vda
}

DISK=/dev/vda
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do
    usleep 100000
    i=$((i + 1))
done
if [ -b /dev/vda ]; then
    DISK=$(records_device)
    # the partition's device node can follow the disk's by a moment
    while [ ! -b "$DISK" ] && [ $i -lt 100 ]; do
        usleep 100000
        i=$((i + 1))
    done
fi

# One 512-byte sector, zero padded, flushed to the device before dd returns.
write_sector() {
    dd of="$DISK" bs=512 seek="$1" count=1 iflag=fullblock conv=sync,notrunc,fsync 2>/dev/null
}

record_loop() {
    header=$(dd if="$DISK" bs=512 count=1 2>/dev/null | tr -d '\000')
    last=0
    case "$header" in
        FMHDR\ last=*) last="${header#FMHDR last=}" && last="${last%% *}" ;;
    esac
    case "$last" in '' | *[!0-9]*) last=0 ;; esac
    seq=$((last + 1))
    pause_us=$((INTERVAL_MS * 1000))
    while :; do
        read -r up idle < /proc/uptime
        if printf 'FMREC seq=%d vm=%s canary=%s up=%s\n' "$seq" "$VM" "$CANARY" "$up" | write_sector "$seq" &&
            printf 'FMHDR last=%d vm=%s\n' "$seq" "$VM" | write_sector 0; then
            echo "FMACK $seq"
            seq=$((seq + 1))
        else
            echo "FERRYMAN-GUEST-ERROR write seq=$seq"
        fi
        usleep "$pause_us"
    done
}

dirty_loop &
start_guest_agent
if [ -b "$DISK" ]; then
    echo "FERRYMAN-GUEST-READY vm=$VM"
    record_loop
fi
echo "FERRYMAN-GUEST-ERROR no $DISK"
echo "FERRYMAN-GUEST-READY vm=$VM"
while :; do
    sleep 3600
done
