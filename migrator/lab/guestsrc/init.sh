#!/bin/sh
# /init of migrator's lab guest (busybox initramfs).
# Kernel command line options it reads:
#   lab.tick=0|1          print "TICK n" every second (default 1): the "guest still runs" oracle
#   lab.dirty=MIB         start the checking dirtier on MIB of memory (default 0: off)
#   lab.rate=MIB_S        limit the dirtier to MIB_S MiB/s (default 0: no limit)
#   lab.pace=cpu          pace the dirtier by work, not by time: its rate then follows the
#                         CPU time the vCPU gets (auto-converge slows it); needs lab.rate
#   lab.out=DEV           where TICK/DIRTY lines go (default: the console), e.g. ttyS1
#   lab.hostname=NAME     the guest's hostname (default: lab-guest)
#   lab.ip=ADDR/PREFIX    configure the first NIC with this address (network: bridge)
#   lab.ip=dhcp           ask the network's DHCP server for an address (busybox udhcpc, kept
#                         running to renew it); prints "LAB-DHCP <addr>/<prefix>" if bound at boot
#   lab.login=USER        ask for a login on the console (getty, login) instead of giving a
#   lab.password=PASSWORD   shell at once: USER (root, or a user of uid 1000) with PASSWORD
# It prints "LAB-READY uptime=<s> mem=<kB>" on the console, then runs a shell (or a login) on
# the console.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
# a job started with '&' runs before the shell reads its next line: with one vCPU the shell
# otherwise went on first, and 'nohup dd ... &' then 'killall -0 dd' (the Autotest seed's
# worker) found no dd in 17 of 60 tries (0 of 60 with this)
echo 1 > /proc/sys/kernel/sched_child_runs_first
# ... and its first exec of the guest tools is not the slow one: under TCG a program's first
# run translates its code, long enough for the job to be preempted before it execs
/usr/bin/nohup /bin/true >/dev/null 2>&1
TICK=1 DIRTY=0 RATE=0 PACE= OUT=/dev/console NAME=lab-guest LOGIN= PASSWORD= IP=
for arg in $(cat /proc/cmdline); do
  case $arg in
    lab.tick=*) TICK=${arg#lab.tick=} ;;
    lab.dirty=*) DIRTY=${arg#lab.dirty=} ;;
    lab.rate=*) RATE=${arg#lab.rate=} ;;
    lab.pace=*) PACE=${arg#lab.pace=} ;;
    lab.out=*) OUT=/dev/${arg#lab.out=} ;;
    lab.hostname=*) NAME=${arg#lab.hostname=} ;;
    lab.ip=*) IP=${arg#lab.ip=} ;;
    lab.login=*) LOGIN=${arg#lab.login=} ;;
    lab.password=*) PASSWORD=${arg#lab.password=} ;;
  esac
done
hostname "$NAME"
# the kernel's virtio drivers are modules: load them (dependencies first) for disks and NICs,
# when the VM has a virtio device (PCI vendor 0x1af4); a VM without one boots 0.3 s sooner
# under TCG (nine insmods)
if grep -qs 0x1af4 /sys/bus/pci/devices/*/vendor; then
  while read -r mod; do insmod "/lib/modules/$mod" 2>/dev/null; done < /lib/modules/load.order
fi
[ -e "$OUT" ] || OUT=/dev/console
if [ -n "$IP" ]; then
  ip link set lo up
  NIC=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
  ip link set "$NIC" up
  if [ "$IP" = dhcp ]; then
    # the address only: no route (the guest network is never routed), no DNS
    mkdir -p /etc/udhcpc
    cat > /etc/udhcpc/script <<'EOS'
#!/bin/sh
case $1 in
  deconfig) ip -4 addr flush dev "$interface" ;;
  bound|renew)
    if ! ip -4 addr show dev "$interface" | grep -q " $ip/$mask "; then
      ip -4 addr flush dev "$interface"
      ip addr add "$ip/$mask" dev "$interface"
    fi
    echo "$ip/$mask" > /tmp/lab-dhcp ;;
esac
EOS
    chmod +x /etc/udhcpc/script
    # up to 3 discovers 1 s apart, then on in the background (-b), asking again every second
    udhcpc -i "$NIC" -s /etc/udhcpc/script -b -t 3 -T 1 -A 1 >/dev/null 2>&1
    echo "LAB-DHCP $(cat /tmp/lab-dhcp 2>/dev/null || echo 'none yet (udhcpc goes on asking)')"
  else
    ip addr add "$IP" dev "$NIC"
  fi
fi
if [ "$TICK" = 1 ]; then
  (i=0; while :; do echo "TICK $i"; i=$((i+1)); sleep 1; done) > "$OUT" 2>&1 &
fi
if [ "$DIRTY" != 0 ]; then
  dirtier "$DIRTY" "$RATE" $PACE > "$OUT" 2>&1 &
fi
if [ -n "$LOGIN" ]; then
  mkdir -p /etc /root
  echo "root:x:0:0:root:/root:/bin/sh" > /etc/passwd
  echo "root:x:0:" > /etc/group
  HASH=$(mkpasswd -m sha512 "$PASSWORD")
  if [ "$LOGIN" = root ]; then
    echo "root:$HASH:19000:0:99999:7:::" > /etc/shadow
  else
    mkdir -p "/home/$LOGIN"
    echo "$LOGIN:x:1000:1000:$LOGIN:/home/$LOGIN:/bin/sh" >> /etc/passwd
    echo "$LOGIN:x:1000:" >> /etc/group
    { echo "root:*:19000:0:99999:7:::"; echo "$LOGIN:$HASH:19000:0:99999:7:::"; } > /etc/shadow
    chown 1000:1000 "/home/$LOGIN"
  fi
  chmod 600 /etc/shadow
fi
echo "LAB-READY uptime=$(cut -d' ' -f1 /proc/uptime) mem=$(awk '/MemTotal/{print $2}' /proc/meminfo)kB"
# PID 1 stays this minimal init: it reaps orphans (daemons such as the memsum holder are
# reparented to it) and respawns the console shell if it exits. The shell must not be PID 1:
# orphans would become its children and its 'wait' would block on them forever.
while :; do
  if [ -n "$LOGIN" ]; then
    setsid getty -L 115200 ttyS0 vt100
  else
    setsid cttyhack sh
  fi
done
