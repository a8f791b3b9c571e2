#!/usr/bin/env bash
# SmolLM2 study arms (issue 16) in one GPU hold (nvidia-h200-x2, or one H200), three calls:
#
#   bash benchmarks/gpu_evidence.sh setup     # carry .whl + .carry/g1: wheels into /tmp/site, GGUF part 1 kept
#   ARMS_A=3,8 ARMS_B=5,7 bash benchmarks/gpu_evidence.sh start   # carry .carry/g2: GGUF checked, chains started
#   (once collect has seen C.done, `start` again with more arms: new logs A2_/B2_/C2_, the GGUF kept)
#   bash benchmarks/gpu_evidence.sh collect   # waits for the chains (up to WAIT_S), packs $OUT/evidence.tgz
#
# Chain A (GPU 0) runs the study arms $ARMS_A one after the other, chain B (GPU 1) the arms $ARMS_B once A has
# built the shared corpus; an arm is its transfer (the recipe's budget) + the suite, 4-11 min on an H200
# (2026-11-30), so two arms per GPU fit one stretch. Then, with both GPUs free, $AFTER (optional, any command,
# e.g. `python3 benchmarks/train_step.py --out $EV/step --lengths 8192 32768 --layouts all-FA 7:1`). On a
# one-GPU machine the chains run one after the other. The chains run in their own sessions (setsid), so they
# outlive a call while the machine is held. Results and logs go to $EV (/root/ev); every `start`/`collect` packs
# the small files so far (no checkpoints) into $OUT/evidence.tgz. Holds so far: arm 2 + the first CP cells
# (docs/evidence/h200-2026-11-30b/), arms 4 and 6 + issue 15's and 13's cells (-30c/), arms 3, 5, 7, 8, 9 + the
# whole step with the new GDN inverse (-30d/; arm 9 by hand beside the AFTER command, which is what a second
# `start` with ARMS_A=4b ARMS_B=9 now does once the first chains are done).
set -u
EV=${EV:-/root/ev}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HYDRAHEAD_SMOLLM2_GGUF=${HYDRAHEAD_SMOLLM2_GGUF:-/root/g/smollm2.gguf}
ARMS_A=${ARMS_A:-4b}  # study arms per chain (comma lists); all but 4b are done (docs/results/)
ARMS_B=${ARMS_B:-}
AFTER=${AFTER:-}

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
  if [ ! -e "$HYDRAHEAD_SMOLLM2_GGUF" ]; then  # a second `start` in the same hold needs no second carry
    cat /root/g/gguf.part.aa .carry/g2/gguf.part.ab .carry/g2/gguf.part.ac > "$HYDRAHEAD_SMOLLM2_GGUF.tmp" || exit 1
    want=$(awk '{print $1}' .carry/g2/sha256.txt)
    have=$(sha256sum "$HYDRAHEAD_SMOLLM2_GGUF.tmp" | awk '{print $1}')
    [ "$want" = "$have" ] || { echo "GGUF sha256 mismatch: $have != $want"; exit 1; }
    mv "$HYDRAHEAD_SMOLLM2_GGUF.tmp" "$HYDRAHEAD_SMOLLM2_GGUF"
  fi
  # a second `start` in the same hold (more arms once the first chains are done) gets its own logs: A2_, B2_, C2_
  n=$(( $(ls "$EV"/after*.sh 2>/dev/null | wc -l) + 1 ))
  if [ "$n" -gt 1 ] && [ ! -e "$EV/C.done" ]; then
    echo "the chains of the previous start still run: collect until C.done, then start again"; exit 2
  fi
  rm -f "$EV"/*.done
  ngpu=$(nvidia-smi -L | wc -l)
  gb=$([ "$ngpu" -ge 2 ] && echo 1 || echo 0)
  share=$([ "$ngpu" -ge 2 ] && echo 0.9 || echo 0.45)
  echo "GGUF ok; $ngpu GPU(s): chain A (arms $ARMS_A) on 0, chain B (arms $ARMS_B) on $gb"
  # Every arm attends packed rows as arm 2 did (2026-11-30): cuDNN with the dense segment mask, at every length.
  packed='--set teacher.model_overrides={\"fa_packed_implementation\":\"mask\"}'  # unescaped by bash -c
  study="python3 -m hydrahead_jax.study --config configs/study/smollm2.py"
  runA=true runB=true  # an empty ARMS_A or ARMS_B leaves that GPU to $AFTER
  [ -n "$ARMS_A" ] && runA="$study --arms $ARMS_A $packed > $EV/A${n}_arms.log 2>&1"
  [ -n "$ARMS_B" ] && runB="$study --arms $ARMS_B $packed > $EV/B${n}_arms.log 2>&1"
  setsid nohup env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=$share bash -c "
    $runA; echo \$? > $EV/armsA.done
    touch $EV/A.done" > /dev/null 2>&1 < /dev/null &
  setsid nohup env CUDA_VISIBLE_DEVICES=$gb XLA_PYTHON_CLIENT_MEM_FRACTION=$share bash -c "
    while [ ! -e runs/smollm2_7to1/corpus/manifest.json ] && [ ! -e $EV/A.done ]; do sleep 5; done
    if [ $ngpu -lt 2 ]; then while [ ! -e $EV/A.done ]; do sleep 5; done; fi
    $runB; echo \$? > $EV/armsB.done
    touch $EV/B.done" > /dev/null 2>&1 < /dev/null &
  mkdir -p "$EV" && printf '%s\n' "$AFTER" > "$EV/after$n.sh"  # run as a file: any quoting survives
  setsid nohup env EV="$EV" bash -c "
    while [ ! -e $EV/A.done ] || [ ! -e $EV/B.done ]; do sleep 5; done
    bash $EV/after$n.sh > $EV/C${n}_after.log 2>&1
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
