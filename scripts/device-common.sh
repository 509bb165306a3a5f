# scripts/device-common.sh: what every scripts/device-* run on the GPU box shares (sourced, not run):
# the run's deadline, `step` (one logged, capped, timed step), the box description, the build step
# and the installation of the carried Python wheels. The caller sets SUMMARY (its summary file)
# and may set STEPS (the steps to run) before sourcing; $OUT must be set.
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
PY=${QLORA_TORCH_PY:-/opt/torch/.venv/bin/python}  # the same override as scripts/device-build
BUILD=${QLORA_BUILD_DIR:-build-gpu}
DEADLINE=$((SECONDS + ${QLORA_DEADLINE_S:-560}))   # the device tool cuts a command at 600 s
: "${SUMMARY:=$OUT/device.summary}"
: >"$SUMMARY"

wanted() { [[ " $STEPS " == *" $1 "* ]]; }

# step NAME CAP_S CMD...: CMD with output teed to $OUT/NAME.log, cut at min(CAP_S, deadline); its
# exit status lands in $OUT/NAME.rc (steps may run in the background, so no shared variable).
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left} s left before the deadline" | tee -a "$SUMMARY"
    echo skipped >"$OUT/$name.rc"
    return 1
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (cap ${cap} s): $*" | tee -a "$SUMMARY"
  local t0=$SECONDS
  timeout -k 10 "$cap" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "== $name: cut after ${cap} s" | tee -a "$SUMMARY"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$SUMMARY"
  echo "$rc" >"$OUT/$name.rc"
  return "$rc"
}

device_info() {
  {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    nvcc --version 2>&1 | tail -1
    git log -1 --format='commit %H' 2>/dev/null
    df -h /tmp 2>&1 | tail -1
    free -g 2>&1 | sed -n 2p
  } | tee "$OUT/device-info.txt"
}

# scripts/device-build (build-gpu + its `qlora_tests "[cuda]"` run); going on when only the tests
# failed, stopping the run when there are no binaries.
build_step() {
  if ! step build "${1:-330}" scripts/device-build; then
    if [ -x "$BUILD/qlora" ] && { [ -n "${QLORA_BUILD_TARGETS:-}" ] || { [ -x "$BUILD/qlora_tests" ] && [ -f "$BUILD/libqlora_ops.so" ]; }; }; then
      echo "device: device-build failed after building (its [cuda] test run?); going on" | tee -a "$SUMMARY"
    else
      echo "device: the build failed; see $OUT/build.log" | tee -a "$SUMMARY"
      exit 1
    fi
  fi
  grep -E "^(test cases|assertions):|FAILED|All tests passed" "$OUT/build.log" | tee -a "$SUMMARY"
}

# Every carried wheel in .devcarry/wheels -> .devcarry/pydeps (the box has no network): pip when
# the venv has it, else unpack (a wheel is a zip of a pure install tree).
install_wheels() {
  local whl ok=0
  mkdir -p .devcarry/pydeps
  for whl in .devcarry/wheels/*.whl; do
    [ -f "$whl" ] || continue
    "$PY" -m pip install -q --no-index --no-deps --target .devcarry/pydeps "$whl" ||
      "$PY" -m zipfile -e "$whl" .devcarry/pydeps/ || ok=1
  done
  return $ok
}
export -f install_wheels
export PY
PYDEPS_ENV="PYTHONPATH=.devcarry/pydeps${PYTHONPATH:+:$PYTHONPATH}"

# Exit status of the run: 0 when every step that ran passed.
finish() {
  local name=$1 status=0 s rc
  for s in $STEPS; do
    [ -f "$OUT/$s.rc" ] || continue
    rc=$(cat "$OUT/$s.rc")
    echo "step $s: $rc" >>"$SUMMARY"
    [ "$rc" = 0 ] || status=1
  done
  echo "== $name: $([ $status -eq 0 ] && echo 'all steps passed' || echo 'some step failed') after $SECONDS s" | tee -a "$SUMMARY"
  exit $status
}
