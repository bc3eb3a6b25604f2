#!/usr/bin/env bash
# The one-shot GPU check, sized for the lent GPU machine (one command of at most 10 minutes; at most 8 files of
# at most 16 MiB come back, 2 folders deep). It writes 3 files into OUT_DIR
# (default $OUT): report.md, train.log, bench.log. Each result is appended to report.md as soon as it is measured,
# so a run cut at its limit still returns what it measured. Run folders and checkpoints stay in $RUNS (/tmp).
#
#   bash tools/gpu_check.sh [OUT_DIR]
#
# Hard limits: each of its 7 parts runs under `timeout -k GRACE LIMIT`: SIGTERM at LIMIT (contragan.py then ends its
# step and saves), SIGKILL GRACE s later (a compile or an evaluation under way is not waited for). LIMITS below:
# 25 + 90 + 45 + 10 + 100 + 75 + 140 = 485 s + 7 graces of 10 s = 555 s at most, inside the 600-s call
# (tools/test_gpu_check.py checks this sum). The parts' own time on one H100/H200: not measured yet.
#
# What it measures: the card; the CUDA training loop for real at the paper's model size (width 96, batch 64, TF32)
# on the built-in shapes data at 32x32 (CIFAR-10 is not on that machine: same model, same cost per iteration), with
# one FID evaluation of 10,000 fakes (random Inception weights unless the real ones are in the torch hub cache:
# the values are then not comparable, their cost is) and a resume; bf16 + --compile reduce-overhead (CUDA graphs)
# through the CLI; then tools/bench.py: s / iteration at width 96 in TF32 and bf16, peak memory, ops and the host
# floor, evaluation; then bf16 eager, bf16 + torch.compile and bf16 + torch.compile reduce-overhead side by side.
# The projected 100k-iteration run with 50 evaluations is computed from the first run.
# A dry run on a CPU, small and fast (no compile):
#   DEVICE=cpu STEPS=4 FID_IMAGES=16 COMPILE= BENCH_COMPILE= EXTRA="--g-width 8 --d-width 8 --batch-size 16" \
#     BENCH="--quick --batch-size 16" bash tools/gpu_check.sh /tmp/x
set -uo pipefail
out=${1:-${OUT:?usage: bash tools/gpu_check.sh OUT_DIR}}
device=${DEVICE:-cuda}
steps=${STEPS:-200}
fid_images=${FID_IMAGES:-10000}
runs=${RUNS:-/tmp/gpu_check_runs}
read -r -a compile <<< "${COMPILE---compile reduce-overhead}"       # COMPILE= : none (minutes on a CPU)
read -r -a extra <<< "${EXTRA:-}"
read -r -a bench <<< "${BENCH:---small-width 96 --small-rounds 0}"  # 0: one iteration each, no second compile
read -r -a compiled <<< "${BENCH_COMPILE---train-options bf16,bf16-compile,bf16-reduce-overhead}"  # = : no compile
# seconds: card, fp32 run, resume, projection, bf16 + compile run, bench, bench's compiled rows; then the grace
read -r t_card t_fp32 t_resume t_projection t_compile t_bench t_compiled grace \
    <<< "${LIMITS:-25 90 45 10 100 75 140 10}"
py=${PYTHON:-$(command -v python3 || command -v python)}         # the lent machine: python3
report=$out/report.md
mkdir -p "$out" && rm -rf "$runs" && mkdir -p "$runs" || exit 2
say() { echo "$*" | tee -a "$report"; }
limited() { local limit=$1; shift; timeout -k "$grace" "$limit" "$@"; }   # every part: SIGTERM, then SIGKILL
weights=random
[ -f "${TORCH_HOME:-$HOME/.cache/torch}/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth" ] && weights=""

say "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')"
say "- $(limited "$t_card" "$py" -c 'import torch
card = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print("card:", f"{card.name}, {card.total_memory / 2**30:.0f} GiB" if card else "none", "| torch", torch.__version__,
      "cuda", torch.version.cuda)')"
say "- data: --dataset shapes at 32x32, the paper's CIFAR-10 model (width 96, batch 64, 5 D steps); FID weights:" \
    "${weights:-TF-ported (real)}${EXTRA:+; EXTRA: $EXTRA}"

train() {  # name, limit in s, flags...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    limited "$limit" "$py" contragan.py --dataset shapes --device "$device" --fid-images "$fid_images" \
        ${weights:+--fid-weights "$weights"} --log-every $((steps / 4 > 0 ? steps / 4 : 1)) "${extra[@]}" "$@" \
        --run-dir "$runs/$name" >> "$out/train.log" 2>&1
    local status=$?
    say "- run $name ($*): exit $status, $((SECONDS - t0)) s; $(grep -E '^(step|eval|error|resumed)' "$out/train.log" |
        tail -n 1 | cut -c1-300)"
}
train fp32 "$t_fp32" --steps "$steps" --eval-every "$steps"           # TF32 on (the default on a GPU)
train fp32 "$t_resume" --resume "$runs/fp32" --steps $((steps + steps / 4))   # continue from last.pt
limited "$t_projection" "$py" - "$runs/fp32/metrics.jsonl" <<'EOF' | tee -a "$report"
import json, sys
try:
    rows = [json.loads(line) for line in open(sys.argv[1])]
except OSError:
    sys.exit(print("- projection: no metrics.jsonl"))
per_step = [r["s_per_step"] for r in rows if "s_per_step" in r][1:]   # the first interval holds the warm-up
fid_s = [r["fid_seconds"] for r in rows if "fid_seconds" in r]
if per_step and fid_s:
    s, e = min(per_step), fid_s[0]
    print(f"- projected 100k-iteration CIFAR-10-size run (contragan.py, fp32/TF32, shapes 32x32): {s:.4f} s / "
          f"iteration x 100,000 = {s * 1e5 / 3600:.2f} h, + 50 evaluations x {e:.1f} s (one FID) = "
          f"{50 * e / 3600:.2f} h; total {(s * 1e5 + 50 * e) / 3600:.2f} h (grid, D diagnostics not included)")
else:
    print(f"- projection: not enough rows (s_per_step {per_step}, fid_seconds {fid_s})")
EOF
train bf16-compile "$t_compile" --steps $((steps / 2 > 0 ? steps / 2 : 1)) --eval-every 100000 --amp bf16 \
    "${compile[@]}" --fid-images 0
rm -rf "$runs"                                                       # checkpoints of ~180 MB: never in OUT_DIR
say ""
limited "$t_bench" "$py" tools/bench.py --device "$device" --sections train,host,eval --train-options bf16 \
    --out "$report" --append "${bench[@]}" > "$out/bench.log" 2>&1
say "- tools/bench.py: exit $?"
limited "$t_compiled" "$py" tools/bench.py --device "$device" --sections train --out "$report" --append \
    "${bench[@]}" "${compiled[@]}" >> "$out/bench.log" 2>&1           # each row lands in report.md as it is timed
say "- tools/bench.py (compiled rows): exit $?"
say "gpu_check: done $(date -u '+%H:%M:%S UTC'), ${SECONDS} s"
