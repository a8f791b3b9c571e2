#!/usr/bin/env bash
# The SmolLM2 evidence run of issues 11 and 16 in one GPU hold (nvidia-h200-x2, or one H200), three calls:
#
#   bash benchmarks/gpu_evidence.sh setup     # carry .whl + .carry/g1: wheels into /tmp/site, GGUF part 1 kept
#   ARMS_A=4 ARMS_B=6 bash benchmarks/gpu_evidence.sh start   # carry .carry/g2: GGUF checked, chains started
#   bash benchmarks/gpu_evidence.sh collect   # waits for the chains (up to WAIT_S), packs $OUT/evidence.tgz
#
# First (both GPUs) issue 15's 7:1 step at 256K and 512K on CP = 2 with FA 'heads' (the default since 2026-11-30;
# the first hold measured 'gather'). Then chain A (GPU 0) runs the study arms $ARMS_A (default 4: random FA groups,
# claim 2) and issue 13's whole-step profile, chain B (GPU 1) the arms $ARMS_B (default 6: layer-wise 3:1, claim 1)
# and the 7:1 step at 512K on one GPU; an arm is its transfer (the recipe's budget) + the suite. Last, with both
# GPUs free: all-FA at 512K on CP = 2 and train.py with configs/long_512k.py. On a one-GPU machine the chains run
# one after the other and the CP = 2 parts are skipped. The chains run in their own sessions (setsid), so they outlive a call while the machine is held. Results
# and logs go to $EV (/root/ev); every `start`/`collect` packs the small files so far (no checkpoints) into
# $OUT/evidence.tgz. The first hold (2026-11-30) ran arm 2 and the CP cells that docs/parallelism.md reports.
set -u
EV=${EV:-/root/ev}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HYDRAHEAD_SMOLLM2_GGUF=/root/g/smollm2.gguf
ARMS_A=${ARMS_A:-4}  # study arms per chain (comma lists); arms 1 and 2 are done (docs/results/)
ARMS_B=${ARMS_B:-6}

status() {
  for f in "$EV"/*.done; do [ -e "$f" ] && echo "done: $(basename "$f")"; done
  for f in "$EV"/*.log; do [ -e "$f" ] && { echo "== $(basename "$f"): $(tail -c 600 "$f" | tr '\r' '\n' | tail -3)"; }; done
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
}

pack() {  # the small result files so far (no checkpoints) -> $OUT/evidence.tgz; every call brings back what exists
  mkdir -p "$OUT" "$EV/results"
  cp -r docs/results/arm*.json docs/results/layouts "$EV/results/" 2>/dev/null
  for run in runs/smollm2_7to1 runs/study/smollm2; do  # the recipe run (arm 2) and the study's other arms
    mkdir -p "$EV/results/$run"
    (cd "$run" 2>/dev/null && find . -maxdepth 2 -type f \( -name 'summary.json' -o -name 'results.txt' \
        -o -name 'metrics.jsonl' -o -name 'loss.png' -o -path './eval/*.json' -o -name 'layout.json' \) \
        -exec cp --parents {} "$EV/results/$run/" \; )
  done
  (cd "$EV" && find . -path ./w -prune -o -type f \
      \( -name '*.json' -o -name '*.jsonl' -o -name '*.txt' -o -name '*.png' -o -name '*.log' \) -size -4M -print \
      | tar czf "$OUT/evidence.tgz" -T -)
  ls -la "$OUT"
}

case "${1:-}" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  mkdir -p /root/g "$EV" && cp .carry/g1/gguf.part.aa /root/g/ || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, optax, orbax.checkpoint as o, grain; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, 'grain', grain.__version__, jax.devices())" \
    | tee "$EV/versions.txt"
  ;;
start)
  cat /root/g/gguf.part.aa .carry/g2/gguf.part.ab .carry/g2/gguf.part.ac > "$HYDRAHEAD_SMOLLM2_GGUF" || exit 1
  want=$(awk '{print $1}' .carry/g2/sha256.txt)
  have=$(sha256sum "$HYDRAHEAD_SMOLLM2_GGUF" | awk '{print $1}')
  [ "$want" = "$have" ] || { echo "GGUF sha256 mismatch: $have != $want"; exit 1; }
  ngpu=$(nvidia-smi -L | wc -l)
  gb=$([ "$ngpu" -ge 2 ] && echo 1 || echo 0)
  share=$([ "$ngpu" -ge 2 ] && echo 0.9 || echo 0.45)
  echo "GGUF ok; $ngpu GPU(s): chain A (arms $ARMS_A) on 0, chain B (arms $ARMS_B) on $gb"
  # Every arm attends packed rows as arm 2 did (2026-11-30): cuDNN with the dense segment mask, at every length.
  packed='--set teacher.model_overrides={\"fa_packed_implementation\":\"mask\"}'  # unescaped by bash -c
  study="python3 -m hydrahead_jax.study --config configs/study/smollm2.py"
  cp="python3 benchmarks/train_cp.py --cell-timeout ${CELL_TIMEOUT:-420}"
  two=$([ "$ngpu" -ge 2 ] && echo 0,1 || echo 0)
  # Phase P (every GPU): issue 15's 7:1 step on CP = 2 with FA 'heads' at 256K and 512K (the first hold measured
  # 'gather'). Then chain A (GPU 0): arms $ARMS_A, then issue 13's whole-step profile; chain B (GPU 1; after A on
  # one GPU): arms $ARMS_B once A has built the shared corpus, then the 7:1 step at 512K on one GPU (does it fit?).
  # Then chain C (every GPU): all-FA at 512K on CP = 2 (one timed step), train.py with configs/long_512k.py.
  setsid nohup bash -c "
    if [ $ngpu -ge 2 ]; then
      CUDA_VISIBLE_DEVICES=0,1 $cp --out $EV/cp2heads --cp 2 --lengths 262144 524288 --layouts 7:1 --steps 2 \
        > $EV/P0_cp2_heads.log 2>&1
    fi
    touch $EV/P.done" > /dev/null 2>&1 < /dev/null &
  setsid nohup env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=$share bash -c "
    while [ ! -e $EV/P.done ]; do sleep 3; done
    $study --arms $ARMS_A $packed > $EV/A1_arms.log 2>&1; echo \$? > $EV/armsA.done
    env -u XLA_PYTHON_CLIENT_MEM_FRACTION python3 benchmarks/train_step.py --out $EV/step --lengths 8192 32768 \
      --layouts all-FA 7:1 --profile 7:1@8192 7:1@32768 all-FA@8192 > $EV/A2_train_step.log 2>&1
    touch $EV/A.done" > /dev/null 2>&1 < /dev/null &
  setsid nohup env CUDA_VISIBLE_DEVICES=$gb XLA_PYTHON_CLIENT_MEM_FRACTION=$share bash -c "
    while [ ! -e $EV/P.done ]; do sleep 3; done
    while [ ! -e runs/smollm2_7to1/corpus/manifest.json ] && [ ! -e $EV/armsA.done ]; do sleep 5; done
    if [ $ngpu -lt 2 ]; then while [ ! -e $EV/A.done ]; do sleep 5; done; fi
    $study --arms $ARMS_B $packed > $EV/B1_arms.log 2>&1; echo \$? > $EV/armsB.done
    env -u XLA_PYTHON_CLIENT_MEM_FRACTION $cp --out $EV/cp1 --cp 1 --lengths 524288 --layouts 7:1 --steps 1 \
      > $EV/B2_cp1_512k.log 2>&1
    touch $EV/B.done" > /dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "
    while [ ! -e $EV/A.done ] || [ ! -e $EV/B.done ]; do sleep 5; done
    if [ $ngpu -ge 2 ]; then
      CUDA_VISIBLE_DEVICES=0,1 $cp --out $EV/cp2fa --cp 2 --lengths 524288 --layouts all-FA --warmup 0 --steps 1 \
        > $EV/C1_cp2_fa.log 2>&1
      CUDA_VISIBLE_DEVICES=0,1 timeout 300 python3 train.py --config configs/long_512k.py --workdir /root/long_512k \
        --set train.progress=false > $EV/C2_train_512k.log 2>&1
    fi
    touch $EV/C.done" > /dev/null 2>&1 < /dev/null &
  sleep "${WAIT_S:-500}"
  status
  pack
  ;;
collect)
  end=$((SECONDS + ${WAIT_S:-540}))
  while [ $SECONDS -lt $end ] && [ ! -e "$EV/C.done" ]; do sleep 10; done
  status
  pack
  ;;
*)
  echo "usage: bash benchmarks/gpu_evidence.sh setup|start|collect"; exit 2 ;;
esac
