#!/usr/bin/env bash
# Flake hunt: run the whole suite N times, each from a fresh clone of HEAD, alternating a clone
# under the home directory and one under /tmp, and tabulate the failures per test.
#
#   scripts/flakehunt.sh N [REV]        (as root; REV defaults to HEAD)
#
# Each run is exactly `make test` (set-up included) in its own clone; its output and a JUnit
# file stay in $FLAKEHUNT_DIR (default /var/tmp/migrator-flakehunt/<timestamp>), the clones are
# removed after each run. Prints a line per run (where, result, seconds, counts) and then
# every test that failed at least once with its count. Exit 0 only when every run was green.
set -uo pipefail

n=${1:?usage: scripts/flakehunt.sh N [REV]}
rev=${2:-HEAD}
repo=$(cd "$(dirname "$0")/.." && pwd)
sha=$(git -C "$repo" rev-parse --verify "$rev^{commit}") || exit 2
out=${FLAKEHUNT_DIR:-/var/tmp/migrator-flakehunt/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
echo "flakehunt: $n run(s) of ${sha:0:12} from clean clones; logs in $out"

green=0
for i in $(seq 1 "$n"); do
  if (( i % 2 )); then base=$HOME; else base=/tmp; fi
  clone=$(mktemp -d "$base/migrator-flakehunt.XXXXXX")
  git clone -q "$repo" "$clone" && git -C "$clone" checkout -q "$sha"
  t0=$(date +%s)
  (cd "$clone" && make test PYTEST_ARGS="--junitxml=$out/run$i.xml" < /dev/null) \
    > "$out/run$i.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  summary=$(grep -E '^=+ .*(passed|failed|error).* in ' "$out/run$i.log" | tail -1 | tr -d '=')
  printf 'run %2d  %-5s  %-4s  %5d s  %s\n' "$i" "$base" "$([ $rc = 0 ] && echo ok || echo FAIL)" \
    "$secs" "${summary:-no summary (rc $rc)}" | tee -a "$out/table.txt"
  [ "$rc" = 0 ] && green=$((green + 1))
  rm -rf "$clone"
done

echo "green: $green of $n" | tee -a "$out/table.txt"
python3 - "$out" <<'EOF' | tee -a "$out/table.txt"
import collections, glob, sys, xml.etree.ElementTree as ET
failed = collections.Counter()
for path in sorted(glob.glob(f"{sys.argv[1]}/run*.xml")):
    for case in ET.parse(path).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed[f"{case.get('classname')}::{case.get('name')}"] += 1
if failed:
    print("failures per test:")
    for name, count in failed.most_common():
        print(f"  {count:3d}  {name}")
else:
    print("no test failed")
EOF
[ "$green" = "$n" ]
