#!/usr/bin/env bash
# Re-measure the six methods mmbench had before issue 11 (OGM, OGM-GE, MMPareto, Re-learning, AGM + competition
# strength, MIE) against their official code with the shared harness (`../shared/conformance`, not in this repo),
# at the mmbench checkout this script sits in. Developer tooling; never run by CI.
#
#   MIRRORS=DIR bash conformance/six.sh HARNESS_DIR VENV_PYTHON OUT_DIR [a] [b]
#
# HARNESS_DIR: the shared harness folder (run_project_conformance.sh, compare_project_b.py, ...).
# MIRRORS: folder holding <owner>+<name>/repo git mirrors of GeWu-Lab/OGM-GE_CVPR2022, GeWu-Lab/MMPareto_ICML2024,
#   GeWu-Lab/Diagnosing_Relearning_ECCV2024, lihong2303/AGM_ICCV2023, njustkmg/IJCAI25-IGM.
# VENV_PYTHON: torch 2.11.0 + mmbench's locked deps + scikit-learn scipy tqdm tensorboard librosa pandas
#   opencv-python-headless transformers (conformance/README.md). mmbench itself is taken from this checkout
#   (PYTHONPATH), so no install is needed and a branch can be measured before it is merged.
# OUT_DIR: official outputs (0.4-1.7 GB each; keep it outside the repository), one report per comparison.
# `a` / `b` pick set A (OGM, OGM-GE, MMPareto, Re-learning) or set B (AGM, competition, MIE); default both.
# Everything runs on one thread (bitwise results need the same thread count on both sides).
set -uo pipefail
H=${1:?usage: MIRRORS=DIR bash conformance/six.sh HARNESS_DIR VENV_PYTHON OUT_DIR [a] [b]}
PY=${2:?venv python}
OUT=${3:?out dir}
shift 3
SETS=${*:-a b}
: "${MIRRORS:?set MIRRORS}"
REPO=$(cd "$(dirname "$0")/.." && pwd)
export MIRRORS PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=1
mkdir -p "$OUT"
echo "mmbench $(git -C "$REPO" rev-parse --short HEAD) at $REPO; harness $H" | tee "$OUT/six.txt"
status=0
case " $SETS " in *" a "*)
  bash "$H/run_project_conformance.sh" "$PY" "$OUT/a" --quick || status=1
  cat "$OUT/a/summary.md" >> "$OUT/six.txt" ;;
esac
case " $SETS " in *" b "*)
  mkdir -p "$OUT/b"
  off() { local n=$1; shift; [ -s "$OUT/b/$n.pt" ] || "$PY" "$H/run_official_b.py" "$@" --threads 1 --out "$OUT/b/$n.pt" > "$OUT/b/$n.official.log" 2>&1 || { echo "official $n failed"; status=1; }; }
  cmp() { local n=$1 m=$2; shift 2; "$PY" "$H/compare_project_b.py" "$m" "$OUT/b/$n.pt" "$@" --json "$OUT/b/$n.json" > "$OUT/b/$n.md" 2>&1
          local rc=$?; echo "$n: rc=$rc" | tee -a "$OUT/six.txt"; [ $rc -eq 0 ] || status=1; }
  off agm_s0 agm --seed 0 --steps 3
  off agm_s5 agm --seed 5 --steps 3                  # clip fires every step, k_a up to 48.5
  off comp_s0 agm_competition --seed 0 --steps 3
  off mie1_s0 mie_stage1 --seed 0 --steps 3
  off mie2_s0 mie_stage2 --seed 0 --steps 2
  cmp agm_s0 agm --mode forced
  cmp agm_s5 agm --mode forced
  cmp comp_s0 agm_competition
  cmp mie1_s0 mie_stage1 --mode forced
  cmp mie2_s0 mie_stage2 --mode forced
  "$PY" "$H/summarize_project_b.py" "$OUT"/b/{agm_s0,agm_s5,comp_s0,mie1_s0,mie2_s0}.json > "$OUT/b/summary.md" 2>&1
  cat "$OUT/b/summary.md" >> "$OUT/six.txt" ;;
esac
exit $status
