#!/usr/bin/env bash
# The SmolLM2 evidence run of issues 11 and 16 in one GPU hold (nvidia-h200-x2, or one H200), three calls:
#
#   bash benchmarks/gpu_evidence.sh setup     # carry .whl + .carry/g1: wheels into /tmp/site, GGUF part 1 kept
#   bash benchmarks/gpu_evidence.sh start     # carry .carry/g2: GGUF assembled + checked, two job chains started
#   bash benchmarks/gpu_evidence.sh collect   # waits for the chains (up to WAIT_S), packs $OUT/evidence.tgz
#
# After a gate (the Pallas packed-document attention must compile and match on the GPU, else the runs use the
# dense-mask path), chain A (GPU 0) runs study arm 2 (the recipe's transfer + the eval suite; issue 11's student).
# Chain B (GPU 1) runs issue 15's one-device cells (benchmarks/train_cp.py, CP = 1: 7:1 at 256K, all-FA at 128K and
# 256K), then, once arm 2 is done, the CP = 2 cells on both GPUs (7:1 at 512K and 256K; train.py with
# configs/long_512k.py; all-FA at 512K last), and chain A ends with the untrained converted student's needle scores.
# On a one-GPU machine the chains run one after the other and the CP = 2 part is skipped. The chains run in their
# own sessions (setsid), so they outlive a call while the machine is held. Results and logs go to $EV (/root/ev);
# every `start`/`collect` packs the small files so far (no checkpoints) into $OUT/evidence.tgz.
set -u
EV=${EV:-/root/ev}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HYDRAHEAD_SMOLLM2_GGUF=/root/g/smollm2.gguf
LENGTHS=1K,2K,4K,8K,16K,32K

status() {
  for f in "$EV"/*.done; do [ -e "$f" ] && echo "done: $(basename "$f")"; done
  for f in "$EV"/*.log; do [ -e "$f" ] && { echo "== $(basename "$f"): $(tail -c 600 "$f" | tr '\r' '\n' | tail -3)"; }; done
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
}

pack() {  # the small result files so far (no checkpoints) -> $OUT/evidence.tgz; every call brings back what exists
  mkdir -p "$OUT" "$EV/results"
  cp -r docs/results/arm*.json docs/results/layouts "$EV/results/" 2>/dev/null
  (cd runs/smollm2_7to1 2>/dev/null && find . -maxdepth 2 -type f \( -name 'summary.json' -o -name 'results.txt' \
      -o -name 'metrics.jsonl' -o -name 'loss.png' -o -path './eval/*.json' -o -name 'layout.json' \) \
      -exec cp --parents {} "$EV/results/" \; )
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
  echo "GGUF ok; $ngpu GPU(s): chain A on 0, chain B on $gb"
  # Gate: the Pallas packed-document attention (untested on a GPU before 2026-11-30) must compile and match; if
  # not, teacher and student attend packed rows through cuDNN with the dense mask (slower, O(T^2) memory).
  packed=""
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 benchmarks/check_packed_attention.py --out "$EV/bench" --T 8192 32768 \
    > "$EV/A0_packed_attention.log" 2>&1 \
    || packed='--set teacher.model_overrides={\"fa_packed_implementation\":\"mask\"}'  # unescaped by bash -c
  tail -n 2 "$EV/A0_packed_attention.log"; echo "transfer extra args: ${packed:-none}"
  # Chain A (GPU 0): study arm 2 = the recipe's three-stage transfer (runs/smollm2_7to1) + the suite on the student
  # (issue 11's student; the teacher, arm 1, was evaluated on 2026-11-30); then, once chain B is done with both
  # GPUs, the untrained converted student on the two needle tasks. Chain B (GPU 1): issue 15's one-device cells
  # (CP = 1, the largest lengths that fit), then, once arm 2 is done, the CP = 2 cells on both GPUs (512K).
  study="python3 -m hydrahead_jax.study --config configs/study/smollm2.py"
  cp="python3 benchmarks/train_cp.py --steps ${CP_STEPS:-2} --cell-timeout ${CELL_TIMEOUT:-420}"
  setsid nohup env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=$share bash -c "
    $study --arms 2 $packed > $EV/A1_arm2.log 2>&1; echo \$? > $EV/arm2.done
    if [ $ngpu -ge 2 ]; then while [ ! -e $EV/B.done ]; do sleep 5; done; fi
    python3 -m hydrahead_jax.eval --model runs/smollm2_7to1/converted --tasks niah_single,niah_multikey \
      --lengths $LENGTHS --examples 8 --seed 0 --max-new-tokens 48 --out $EV/eval_converted \
      > $EV/A2_eval_converted.log 2>&1
    touch $EV/A.done" > /dev/null 2>&1 < /dev/null &
  setsid nohup env CUDA_VISIBLE_DEVICES=$gb bash -c "
    if [ $ngpu -lt 2 ]; then while [ ! -e $EV/arm2.done ]; do sleep 5; done; fi
    $cp --out $EV/cp1 --cp 1 --lengths 262144 --layouts 7:1 > $EV/B1_cp1.log 2>&1
    $cp --out $EV/cp1fa --cp 1 --lengths 131072 262144 --layouts all-FA --steps 1 > $EV/B2_cp1_fa.log 2>&1
    if [ $ngpu -ge 2 ]; then
      while [ ! -e $EV/arm2.done ]; do sleep 5; done
      export CUDA_VISIBLE_DEVICES=0,1
      $cp --out $EV/cp2 --cp 2 --lengths 524288 262144 --layouts 7:1 > $EV/B3_cp2.log 2>&1
      timeout 300 python3 train.py --config configs/long_512k.py --workdir /root/long_512k --set train.progress=false \
        > $EV/B4_train_512k.log 2>&1
      $cp --out $EV/cp2fa --cp 2 --lengths 524288 --layouts all-FA --steps 1 > $EV/B5_cp2_fa.log 2>&1
    fi
    touch $EV/B.done" > /dev/null 2>&1 < /dev/null &
  sleep "${WAIT_S:-500}"
  status
  pack
  ;;
collect)
  end=$((SECONDS + ${WAIT_S:-540}))
  while [ $SECONDS -lt $end ] && { [ ! -e "$EV/A.done" ] || [ ! -e "$EV/B.done" ]; }; do sleep 10; done
  status
  pack
  ;;
*)
  echo "usage: bash benchmarks/gpu_evidence.sh setup|start|collect"; exit 2 ;;
esac
