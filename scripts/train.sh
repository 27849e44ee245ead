#!/usr/bin/env bash
# Launch `neva train` on one node with torchrun or on a SLURM allocation with srun.
#   scripts/train.sh NPROC CONFIG.yaml [key=value ...]          # torchrun, one node, NPROC processes
#   sbatch -N 2 --ntasks-per-node=8 --gpus-per-node=8 scripts/train.sh slurm CONFIG.yaml [key=value ...]
# With SLURM, MASTER_ADDR is the first node of the allocation and every task is one rank (srun).
# Killing the launcher (torchrun or srun) stops the ranks; a second job on the same run directory stops at once.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${NEVA_PYTHON:-$here/.venv/bin/python}"
mode="$1"; shift
if [[ "$mode" == "slurm" ]]; then
  export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  export MASTER_PORT="${MASTER_PORT:-29500}"
  exec srun --kill-on-bad-exit=1 "$python" -m neva_tools train "$@"
fi
# torchrun starts each rank in its own session: the ranks watch this pid (torchrun's, after exec) and die with it.
# neva_tools.utils.launch is torchrun (same arguments) ending a failed job with the rank's error, not a traceback.
export NEVA_LAUNCHER_PID=$$
exec "$python" -m neva_tools.utils.launch --standalone --nproc_per_node="$mode" -m neva_tools train "$@"
