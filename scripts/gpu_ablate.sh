#!/usr/bin/env bash
# `mscn ablate` on a lent GPU machine, within one call's time limit, handing back every
# finished run (docs/RESULTS.md, "Ablations").
#   bash scripts/gpu_ablate.sh "ratio,focal,channel,method" 3 schedule.epochs=4
# Runs for at most $MSCN_ABLATE_LIMIT seconds (default 540); exits 3 when it stopped there. The ablation runs seed by
# seed and keeps each finished run, so a second call on the same warm machine goes on
# where the first stopped. Every call leaves in $OUT: the log, ablation.{json,md,png} when
# the grid completed, and results.tar.gz with every finished run's result.json. Unpack
# that tarball into a folder here and rerun the same `mscn ablate ... --out FOLDER` from
# the repository root: finished runs are recognised by their config's fingerprint and
# skipped, and the table is written from them (also for a grid cut short: pass the
# number of seeds that completed).
set -uo pipefail
cd "$(dirname "$0")/.."
GRIDS=${1:?usage: $0 GRIDS SEEDS [key=value ...]}
SEEDS=${2:?usage: $0 GRIDS SEEDS [key=value ...]}
shift 2
OUT=${OUT:-/tmp/mscn_ablate_out}
DIR=${MSCN_ABLATE_DIR:-/tmp/mscn_ablate}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$DIR"
rm -f "$DIR"/ablation.*  # only a grid completed by this call hands back a table
# -P: the checkout's mscn/ folder must not shadow the installed package
timeout "${MSCN_ABLATE_LIMIT:-540}" $PY -P -m mscn ablate --config demo --arms "$GRIDS" --seeds "$SEEDS" \
    --out "$DIR" "$@" >>"$OUT/ablate.log" 2>&1
rc=$?
if [ $rc -eq 124 ]; then  # the planned stop, not a failure: exit 3, not timeout's 124
  echo "gpu_ablate: stopped at the ${MSCN_ABLATE_LIMIT:-540} s limit; rerun to go on" | tee -a "$OUT/ablate.log"
  rc=3
fi
cp "$DIR"/ablation.* "$OUT"/ 2>/dev/null
(cd "$DIR" && find . -name result.json -print0 | tar --null -czf "$OUT/results.tar.gz" -T -)
grep -E "^\[ablate\]|^\|" "$OUT/ablate.log" | tail -n 40
exit $rc
