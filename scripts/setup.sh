#!/usr/bin/env bash
# System set-up for migrator: packages, the venv, the lab guest image. Idempotent; run as root.
#
# What it does, in order (each step is skipped when already done):
#   1. adds Debian's bookworm-backports suite (same mirror and key as the machine's own entry);
#   2. installs the packages with --no-install-recommends behind a temporary policy-rc.d, so no
#      sshd or libvirtd starts in the root namespace. QEMU 10 and libvirt 11.3 come from
#      bookworm-backports with the pins of shared/lab-recipe.md section 10.1: Debian 12's QEMU 7.2
#      loses dirty pages under TCG, which would make every memory-integrity check meaningless;
#   3. creates the venv (.venv), installs migrator editable with its test extras, and
#      byte-compiles it;
#   4. builds (or reuses) the cached lab guest image;
#   5. extracts Debian 12's QEMU 7.2 into its own prefix (migrate-lab qemu install 7.2), next to
#      the system's QEMU 10 and replacing nothing: the cross-version tests and the dirtier
#      check's test (7.2 loses dirty pages under TCG) run it.
# Environment: PYTHON (interpreter for the venv, default python3), VENV (default ./.venv),
#              MIGRATOR_SKIP_IMAGE=1 to skip step 4.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$here/.venv}
PYTHON=${PYTHON:-python3}
log() { printf '[setup %5.1fs] %s\n' "$(( $(date +%s%N) - t0 ))e-9" "$*"; }
t0=$(date +%s%N)

if [ "$(id -u)" != 0 ]; then
  echo "setup: must run as root (it installs packages and the lab needs namespaces); try: sudo $0" >&2
  exit 2
fi

# ---- 1. bookworm-backports ---------------------------------------------------------------
bpo=/etc/apt/sources.list.d/bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  src=/etc/apt/sources.list.d/debian.sources
  if [ ! -f "$src" ]; then
    echo "setup: $src not found; add a bookworm-backports apt source by hand and re-run" >&2
    exit 2
  fi
  awk 'BEGIN{RS=""} NR==1' "$src" \
    | awk '/^Suites:/ {print "Suites: bookworm-backports"; next} /^#/ {next} {print}' > "$bpo"
  log "added $bpo"
  need_update=1
fi

# ---- 2. packages -----------------------------------------------------------------------------
base_pkgs=(openssh-server openssh-client busybox-static iproute2 socat nftables gcc libc6-dev
           pkg-config procps util-linux psmisc xz-utils cpio dnsmasq-base
           chromium)   # the tests load report.html in a real browser (headless, DevTools)
qemu_pkgs=(qemu-system-x86 qemu-utils)
virt_pkgs=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev)

installed_version() { dpkg-query -W -f='${db:Status-Abbrev} ${Version}' "$1" 2>/dev/null | awk '$1=="ii"{print $2}'; }
missing=()
for p in "${base_pkgs[@]}" "${virt_pkgs[@]}"; do
  [ -n "$(installed_version "$p")" ] || missing+=("$p")
done
qemu_ok=0
case "$(installed_version qemu-system-x86)" in 1:1[0-9].*) qemu_ok=1 ;; esac
case "$(installed_version libvirt-daemon)" in 1[1-9].*) ;; *) missing+=(libvirt-daemon) ;; esac

if [ ${#missing[@]} -gt 0 ] || [ $qemu_ok = 0 ]; then
  policy=/usr/sbin/policy-rc.d
  saved_policy=""
  if [ -e "$policy" ]; then saved_policy=$(mktemp); cp -p "$policy" "$saved_policy"; fi
  restore_policy() {
    if [ -n "$saved_policy" ]; then mv -f "$saved_policy" "$policy"; else rm -f "$policy"; fi
  }
  trap restore_policy EXIT
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  log "apt-get update done"
  # bookworm first: -t bookworm-backports here would also take openssh, iproute2 and socat from backports
  apt-get install -y -qq --no-install-recommends "${base_pkgs[@]}" >/dev/null
  log "base packages installed"
  apt-get install -y -qq -t bookworm-backports --no-install-recommends "${qemu_pkgs[@]}" >/dev/null
  log "QEMU installed: $(qemu-system-x86_64 --version | head -1)"
  # libvirt-daemon-driver-qemu needs "systemd-container | sysvinit-core" and polkitd needs a logind.
  # Pin the whole systemd family to bookworm (recipe 10.1), or -t would pull systemd 254 from
  # backports; installed members are pinned too, else apt removes them to resolve the point
  # release. libvirt-daemon-system is not wanted (it brings systemd-sysv as init).
  pins=(systemd-container/bookworm systemd/bookworm libpam-systemd/bookworm)
  for p in libnss-systemd systemd-timesyncd systemd-sysv udev libudev1; do
    [ -n "$(installed_version "$p")" ] && pins+=("$p/bookworm")
  done
  apt-get install -y -qq -t bookworm-backports --no-install-recommends \
    "${virt_pkgs[@]}" "${pins[@]}" >/dev/null
  log "libvirt installed: $(libvirtd --version)"
  restore_policy; trap - EXIT
else
  log "packages already installed ($(qemu-system-x86_64 --version | head -1))"
fi

case "$(qemu-system-x86_64 --version | head -1)" in
  *"version 1"[0-9].*) ;;
  *) echo "setup: QEMU >= 10 is required (7.2 loses dirty pages under TCG); got: $(qemu-system-x86_64 --version | head -1)" >&2
     exit 1 ;;
esac

# ---- 3. venv ---------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" - <<'PY' || { echo "setup: Python >= 3.11 is required (set PYTHON=...)" >&2; exit 2; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
  "$PYTHON" -m venv "$VENV"
  log "venv created at $VENV"
fi
stamp="$VENV/.migrator-installed"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e "$here[test]"
  touch "$stamp"
  log "migrator installed into $VENV"
else
  log "venv up to date"
fi
# the package's bytecode, once (an editable install writes none, and neither does Python
# where PYTHONDONTWRITEBYTECODE is set, as on CI machines): otherwise every migrate-run
# compiles its ~100 modules again, 0.1 s per start measured (issue 22); stale files are
# only rewritten
"$VENV/bin/python" -m compileall -q "$here/migrator" "$here/syncserver" >/dev/null

# ---- 4. guest image ----------------------------------------------------------------------------
if [ "${MIGRATOR_SKIP_IMAGE:-0}" != 1 ]; then
  "$VENV/bin/migrate-lab" image
fi
# ---- 5. QEMU 7.2 beside the system's ----------------------------------------------------------
"$VENV/bin/migrate-lab" qemu install 7.2
log "set-up complete"
