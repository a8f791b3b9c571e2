#!/usr/bin/env bash
# The SmolLM2 evidence run of issues 11, 12 and 13 in one GPU hold (nvidia-h200-x2, or one H200), three calls:
#
#   bash benchmarks/gpu_evidence.sh setup     # carry .whl + .carry/g1: wheels into /tmp/site, GGUF part 1 kept
#   bash benchmarks/gpu_evidence.sh start     # carry .carry/g2: GGUF assembled + checked, two job chains started
#   bash benchmarks/gpu_evidence.sh collect   # waits for the chains (up to WAIT_S), packs $OUT/evidence.tgz
#
# Chain A (GPU 0): the three-stage transfer (configs/transfer/smollm2_7to1.py), then the eval suite on the
# student, then the generation-efficiency table. Chain B (GPU 1; GPU 0 too on a one-GPU machine): the eval suite
# on the teacher and on the converted student, cached vs uncached decoding on the teacher, then the whole-model
# train-step table with its profile (on one GPU only after chain A's transfer, so the timings are not shared).
# The chains run in their own sessions (setsid), so they outlive a call while the machine is held. Results and
# logs go to $EV (/root/ev); `collect` packs the small files (no checkpoints) into one tarball under $OUT.
set -u
EV=${EV:-/root/ev}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HYDRAHEAD_SMOLLM2_GGUF=/root/g/smollm2.gguf
TASKS=niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,mqar,ppl
LENGTHS=1K,2K,4K,8K,16K,32K
EXAMPLES=${EXAMPLES:-16}
W=$EV/w

status() {
  for f in "$EV"/*.done; do [ -e "$f" ] && echo "done: $(basename "$f")"; done
  for f in "$EV"/*.log; do [ -e "$f" ] && { echo "== $(basename "$f"): $(tail -c 600 "$f" | tr '\r' '\n' | tail -3)"; }; done
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
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
  evalcmd="python3 -m hydrahead_jax.eval --tasks $TASKS --lengths $LENGTHS --seed 0 --max-new-tokens 48"
  setsid nohup env CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=$share bash -c "
    python3 train.py --config configs/transfer/smollm2_7to1.py --workdir $W --set progress=false $packed \
      > $EV/A1_transfer.log 2>&1; echo \$? > $EV/transfer.done
    $evalcmd --examples $EXAMPLES --model $W/stages/long/model --out $EV/eval_student > $EV/A2_eval_student.log 2>&1
    python3 benchmarks/bench_generation.py --out $EV/bench --lengths 8192 32768 131072 --reps 2 \
      > $EV/A3_bench_generation.log 2>&1
    touch $EV/A.done" > /dev/null 2>&1 < /dev/null &
  setsid nohup env CUDA_VISIBLE_DEVICES=$gb XLA_PYTHON_CLIENT_MEM_FRACTION=$share bash -c "
    $evalcmd --examples $EXAMPLES --model smollm2 --out $EV/eval_teacher > $EV/B1_eval_teacher.log 2>&1
    while [ ! -d $W/stages ] && [ ! -e $EV/transfer.done ]; do sleep 5; done
    $evalcmd --examples 8 --model $W/converted --out $EV/eval_converted > $EV/B2_eval_converted.log 2>&1
    python3 benchmarks/bench_cached_decoding.py --model smollm2 --length 4096 --new 32 --out $EV/bench \
      > $EV/B3_cached_decoding.log 2>&1
    if [ $ngpu -lt 2 ]; then while [ ! -e $EV/transfer.done ]; do sleep 5; done; fi
    python3 benchmarks/train_step.py --out $EV/bench --lengths 8192 32768 --profile 7:1@8192 7:1@32768 all-FA@8192 \
      > $EV/B4_train_step.log 2>&1
    python3 benchmarks/train_step.py --out $EV/bench --lengths 8192 32768 --layouts 7:1 --set la_sharing=kv \
      --tag _kv > $EV/B5_train_step_kv.log 2>&1
    python3 benchmarks/train_step.py --out $EV/bench --lengths 65536 --layouts all-FA 7:1 --tag _64k \
      > $EV/B6_train_step_64k.log 2>&1
    touch $EV/B.done" > /dev/null 2>&1 < /dev/null &
  sleep "${WAIT_S:-500}"
  status
  ;;
collect)
  end=$((SECONDS + ${WAIT_S:-540}))
  while [ $SECONDS -lt $end ] && { [ ! -e "$EV/A.done" ] || [ ! -e "$EV/B.done" ]; }; do sleep 10; done
  status
  mkdir -p "$OUT"
  (cd "$EV" && find . -path ./w/corpus -prune -o -path ./w/teacher_run -prune -o -type f \
      \( -name '*.json' -o -name '*.jsonl' -o -name '*.txt' -o -name '*.png' -o -name '*.log' \) -size -4M -print \
      | grep -v -e '/model/' -e '/checkpoints/' -e '/converted/' -e '/tokenizer/' \
      | tar czf "$OUT/evidence.tgz" -T -)
  ls -la "$OUT"
  ;;
*)
  echo "usage: bash benchmarks/gpu_evidence.sh setup|start|collect"; exit 2 ;;
esac
