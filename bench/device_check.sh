#!/usr/bin/env bash
# Issue 6's owed GPU checks and figures in one device call. A lease gives about 9 minutes of
# command time, so every part runs under its own time limit, cut to what is left of
# DEVICE_CHECK_S: one that hangs or fails costs only its share, and the parts after it still run.
# Each part (a function that sets the command `cmd`) writes <part>.json under $OUT and its log
# into $OUT/device_check.log as it runs: the device tool brings back at most 8 files from $OUT, so
# a log per part would lose some parts' figures. The summary at the end is what the tool's reply
# shows. Arguments name the parts to run, in order (default: all but `tuning`, most needed first;
# `tuning` is for a second call).
#
#   here, once:  bash bench/fetch_wheels.sh        (webdataset and braceexpand, absent there)
#   device run:  command "bash bench/device_check.sh", carry [".whl"], timeout_s 600
#   here, tiny:  DEVICE_CHECK_SMOKE=1 OUT=/tmp/dc PYTHON=.venv/bin/python bash bench/device_check.sh
#                (tries the script on the CPU at tiny scale: its figures mean nothing)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
logs=$(mktemp -d)  # each part's log on its own, for the summary
trap 'rm -rf "$logs"' EXIT
mkdir -p "$OUT"
deadline=$((SECONDS + ${DEVICE_CHECK_S:-510}))
py=${PYTHON:-python3}
if [ -d .whl ] && ! $py -c "import webdataset" 2>/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ -n "${DEVICE_CHECK_SMOKE:-}" ]; then
  b16=(--config configs/pretrain/tiny.yaml --batch 8 --classes 8 --warmup 1 --steps 1 --repeats 1 --check-steps 2)
  l16=("${b16[@]}") pipeline=(--quick) jpegs=$OUT/jpegs
else
  b16=(--config configs/pretrain/vit_b16.yaml --batch 256 --warmup 3 --steps 10 --repeats 3 --check-steps 10)
  l16=(--config configs/pretrain/vit_l16.yaml --batch 128 --warmup 3 --steps 10 --repeats 3 --check-steps 10)
  jpegs=/tmp/jpegs
  pipeline=(--samples 12000 --per-shard 500 --workers 16 --batch 256 --train-workers 16 --train-steps 40
            --log-every 10 --train-timeout 120)
fi
timm=timm  # compiled, in the smoke too: the path the GPU runs
vitdist="vitdist:dist.strategy=ddp"  # one GPU: vitdist's step without the DDP wrapper
autotune="inductor.max_autotune_gemm=true;inductor.max_autotune_gemm_backends=TRITON"

# The GPU-only tests: the loop never waits for the device, the log window's clock, nvJPEG and the
# batched resize against the CPU path (TF32 included).
gpu_tests() {
  cmd=($py -m pytest -q -rs -p no:cacheprovider tests/test_gpu_decode.py
       tests/test_train.py::test_training_steps_never_make_the_host_wait_for_the_gpu
       tests/test_metrics.py::test_a_log_window_ends_when_the_gpu_has_run_its_steps)
}
# Target 1: the step against timm's in one process. It also fills inductor's cache with the
# compiled ViT-B/16 that data_e2e's training runs then reuse.
step_b16() { cmd=($py bench/train_step.py "${b16[@]}" --variants "$timm,$vitdist" --out "$OUT/step_b16.json"); }
# Target 2: end to end from JPEG shards, cpu and gpu decode, 16 workers on 16 cores.
data_e2e() { cmd=($py bench/data_pipeline.py "${pipeline[@]}" --cache "$jpegs" --out "$OUT/data_e2e.json"); }
# Checkpointing on both.
step_b16_ckpt() { cmd=($py bench/train_step.py "${b16[@]}" --ckpt --variants "$timm,$vitdist" --out "$OUT/step_b16_ckpt.json"); }
step_l16() { cmd=($py bench/train_step.py "${l16[@]}" --variants "$timm,$vitdist" --out "$OUT/step_l16.json"); }
# The memory budget's middle ways between step_b16's and step_b16_ckpt's vitdist rows (peak memory
# and img/s): last, as no target needs them.
budget() {
  cmd=($py bench/train_step.py "${b16[@]}" --out "$OUT/budget.json"
       --variants "$vitdist;train.activation_memory_budget=0.5,$vitdist;train.activation_memory_budget=0.2")
}
# The average of the weights' update after each step (train.ema_decay): its cost, predicted at about
# 0.5% of the ViT-B/16 step (a pass over 3 fp32 copies of 86M parameters), and its memory.
ema() { cmd=($py bench/train_step.py "${b16[@]}" --variants "$vitdist,$vitdist;train.ema_decay=0.9999" --out "$OUT/ema.json"); }
# The compiler's levers outside the GEMMs, on both: CUDA graphs, reduction kernels' tuning, Triton
# GEMM templates that take in the bias/GELU/residual passes. In order of compile time: the GEMM
# autotuning takes minutes, and a part stopped at its limit keeps the rows before.
tuning() {
  cmd=($py bench/train_step.py "${b16[@]}" --variants "$timm:inductor.triton.cudagraphs=true,\
$vitdist;inductor.triton.cudagraphs=true,$timm:inductor.coordinate_descent_tuning=true,\
$vitdist;inductor.coordinate_descent_tuning=true,$timm:$autotune,$vitdist;$autotune" --out "$OUT/tuning.json")
}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(gpu_tests step_b16 data_e2e step_b16_ckpt step_l16 budget ema)
declare -A limit=([gpu_tests]=120 [step_b16]=170 [data_e2e]=240 [step_b16_ckpt]=150 [step_l16]=180 [budget]=150
                  [ema]=120 [tuning]=500)
for name in "${parts[@]}"; do
  [ -n "${limit[$name]:-}" ] || { echo "unknown part '$name'; parts: ${!limit[*]}" >&2; exit 2; }
done
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__,
  'torchvision', torchvision.__version__)"
  echo "$(nproc) CPU cores"; } > "$logs/env" 2>&1
cat "$logs/env" > "$OUT/device_check.log"
summary=()
for name in "${parts[@]}"; do
  left=$((deadline - SECONDS)) cap=${limit[$name]}
  if [ "$left" -lt 20 ]; then summary+=("$name: not run, no time left"); continue; fi
  [ "$cap" -gt "$left" ] && cap=$left
  start=$SECONDS
  "$name"  # sets cmd
  echo "===== $name: ${cmd[*]}" >> "$OUT/device_check.log"
  timeout --kill-after=10 "$cap" "${cmd[@]}" 2>&1 | tee "$logs/$name" >> "$OUT/device_check.log"
  summary+=("$name: exit $? after $((SECONDS - start)) s (limit $cap s)")
done

cat "$logs/env"
printf '%s\n' "${summary[@]}"
# Each part's figures under its name. A part stopped at its limit printed no table: its finished
# measurements' lines instead (its JSON holds them too), and the last lines of its log.
for name in "${parts[@]}"; do
  log="$logs/$name"
  [ -f "$log" ] || continue
  echo "== $name"
  case $name in
    gpu_tests) grep -h "passed\|failed\|SKIPPED\|Error" "$log" | tail -n 15 ;;
    data_e2e) sed -n '/^| measurement/,$p' "$log" | grep . || grep "^loader \|^device work \|^training " "$log" ;;
    *) sed -n '/ bf16 matmul peak /,$p' "$log" | grep . || grep '^{"variant"' "$log" | cut -c1-220 ;;
  esac
  grep -q "^| measurement\| bf16 matmul peak \|passed\|failed" "$log" || grep -v '^{"variant"' "$log" | tail -n 4
done
