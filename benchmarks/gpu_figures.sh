#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md, one section per call (each fits in a 10-minute slot):
#   bash benchmarks/gpu_figures.sh atari OUT   # PPO vs SB3 (64 envs), replay memory (200k), DQN vs SB3, on CUDA
#   bash benchmarks/gpu_figures.sh llm OUT     # LLM step vs TRL (default and large batch), addition on CUDA
#   bash benchmarks/gpu_figures.sh pong OUT    # PPO on Pong for 9 minutes: the curve toward a mean return of 18
# OUT is a folder for the logs (default benchmarks/out). Needs `bash .ci/setup --bench` and a CUDA GPU.
# Every command runs under `timeout -s INT` (Ctrl-C: a training run saves its checkpoint and summary.json
# before it exits) so that one slow step cannot eat the others' time. Run folders go to runs/gpu_*.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: gpu_figures.sh atari|llm|pong [OUT]}
out=${2:-benchmarks/out}
mkdir -p "$out"
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() {  # step NAME SECONDS CMD...: run CMD with a time limit, log to $out/NAME.log, say how long it took
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout -s INT -k 30 "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v '^\s*$' | tail -n 40
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

case $what in
atari)
  step ppo_vs_sb3 240 $PY benchmarks/bench_ppo.py --device cuda --num-envs 64 --steps 81920
  step replay 150 $PY benchmarks/bench_replay.py --device cuda --buffer-size 200000 --seconds 8 --rounds 4
  step dqn_vs_sb3 150 $PY benchmarks/bench_dqn.py --device cuda --seconds 45
  ;;
llm)
  step cuda_tests 120 $PY -m pytest -q -x tests/test_llm_policy.py tests/test_llm_agent.py
  step trl_default 150 $PY benchmarks/bench_trl.py --device cuda --steps 5
  # 64 prompts x 8 ran out of the H100's 80 GB in TRL's loss (both sides share the process): 16 x 8.
  step trl_large 200 $PY benchmarks/bench_trl.py --device cuda --prompts 16 --group-size 8 --max-new-tokens 64 --steps 3
  # 300 batches of the default recipe (16 prompts x 8) on CUDA (mixed precision; add --dtype float32 for the
  # float32 run of RESULTS.md), evaluated on the 500 held-out problems every 30 batches.
  step addition_cuda 300 $PY -m agents.cli train ppo addition --device cuda --steps 38400 --eval-every 3840 \
    --eval-at-start --no-progress --run-dir runs/gpu_addition
  ;;
pong)
  # Wall-clock time for PPO to reach a 100-episode mean return >= 18 on Pong (ALE v5: sticky actions 0.25).
  # One call gets 9 minutes; the next continues from the checkpoint if runs/gpu_pong18 is still there (on a
  # fresh machine, bring it along). Time to 18 = the train_seconds of the segments before it, added up.
  if [ -f runs/gpu_pong18/checkpoints/latest.pt ]; then
    step pong18 540 $PY -m agents.cli train ppo pong --resume runs/gpu_pong18 --no-progress
  else
    step pong18 540 $PY -m agents.cli train ppo pong --device cuda --num-envs 32 --steps 4000000 \
      --num-minibatches 8 --no-progress --run-dir runs/gpu_pong18
  fi
  ;;
*) echo "unknown section $what: use atari, llm or pong"; exit 2 ;;
esac
