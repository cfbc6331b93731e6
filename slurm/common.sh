# Sourced by the batch scripts (slurm/*.sbatch): one process per task started by srun, each told
# its rank by SLURM (RANK <- SLURM_PROCID, WORLD_SIZE <- SLURM_NTASKS, LOCAL_RANK <- SLURM_LOCALID, read
# by disco_dist.cluster.distributed), the master address from the job's first node; disco_dist.cluster.distributed derives
# the port from the job id (set MASTER_PORT to choose it).
# Submit from the repository root (sbatch copies the script away, so its own path says nothing), or set
# DISCO_REPO to it.
REPO=${DISCO_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$REPO/launchers/distill.py" ]; then
  echo "error: $REPO is not the disco-dist repository; submit from its root or set DISCO_REPO" >&2
  exit 2
fi
cd "$REPO"
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's disco_dist, installed or not
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
# one rank per task: as many threads as CPUs SLURM gave the task, never the whole node's
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export TOKENIZERS_PARALLELISM=false
# multi-node NCCL: pick the right interface if the default is wrong, e.g. NCCL_SOCKET_IFNAME=ib0 (see README)

# log_to_run_dir DIR: a copy of everything this job prints goes to DIR/slurm-<job id>.log, and every rank's error
# line also to DIR/slurm-<job id>.errors, with its time and host (DISCO_ERROR_LOG): the job's output passes through
# srun on its first node, so when that node is lost the other ranks' lines would be lost with it. A requeued run
# starts by printing the earlier runs' error lines.
log_to_run_dir() {
  mkdir -p "$1"
  exec > >(tee -a "$1/slurm-${SLURM_JOB_ID}.log") 2>&1
  export DISCO_ERROR_LOG=$1/slurm-${SLURM_JOB_ID}.errors
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    echo "run $((SLURM_RESTART_COUNT + 1)) of SLURM job $SLURM_JOB_ID on $SLURM_JOB_NODELIST; what the ranks of its earlier runs said ($DISCO_ERROR_LOG):"
    if [ -s "$DISCO_ERROR_LOG" ]; then sed 's/^/  /' "$DISCO_ERROR_LOG"; else echo "  nothing (no rank printed an error)"; fi
  fi
}

# run_on_tasks LAUNCHER ARGS...: run launchers/LAUNCHER on every task of the job
# A requeued job numbers its steps from 0 again, and SLURM re-sends a step signal that could not reach a lost node
# once the node is back (about 60 s later, to StepId=<job>.<step>): the signal with which srun ended the lost run's
# step would end the new run's step of the same number (measured: "_rpc_signal_tasks: sending signal 991 to
# StepId=13.0" on the returned node, 61 s after "RPC:REQUEST_SIGNAL_TASKS : Communication connection failure").
# So run k of a job (k = SLURM_RESTART_COUNT; each run launches one step) first spends step numbers 0 .. k-1 on
# a one-task step each, and its own step is <job>.k, a number no earlier run used.
# A run that fails although no rank stopped on something to fix -- every line its ranks kept in DISCO_ERROR_LOG says
# `exit 75` (another rank was lost), or none said anything (a rank was killed: the OOM killer, a node's trouble) --
# is requeued, up to DISCO_MAX_RESTARTS (default 3) times a job; it resumes from what is kept (--resume auto, the
# finished shards). A line with another code (a bad flag, a corrupt shard, a full disk; 3: pre-empted, already
# requeued) ends the job.
run_on_tasks() {
  local spent said=0 status=0
  for ((spent = 0; spent < ${SLURM_RESTART_COUNT:-0}; spent++)); do
    srun --nodes=1 --ntasks=1 --cpu-bind=none true || true  # a stale signal may end it: it has nothing to lose
  done
  [ -f "${DISCO_ERROR_LOG:-}" ] && said=$(wc -l < "$DISCO_ERROR_LOG")
  srun --kill-on-bad-exit=1 --cpu-bind=none "$PYTHON" "launchers/$1" "${@:2}" || status=$?
  [ "$status" = 0 ] && return 0
  requeue_if_nothing_to_fix "$said" "$status"
  return "$status"
}

# requeue_if_nothing_to_fix LINES STATUS: requeue this job when the ranks' lines past the first LINES of
# DISCO_ERROR_LOG all say exit 75, within DISCO_MAX_RESTARTS
requeue_if_nothing_to_fix() {
  local restarts=${SLURM_RESTART_COUNT:-0} limit=${DISCO_MAX_RESTARTS:-3} other=""
  [ -f "${DISCO_ERROR_LOG:-}" ] && other=$(tail -n "+$(($1 + 1))" "$DISCO_ERROR_LOG" | grep -v '^[^ ]* [^ ]* exit 75: ' || true)
  [ -z "$other" ] || return 0
  if [ "$restarts" -ge "$limit" ]; then
    echo "the run failed (srun exit $2) after $restarts restart(s), the most DISCO_MAX_RESTARTS=$limit allows: not requeued; see $DISCO_ERROR_LOG"
    return 0
  fi
  echo "the run failed (srun exit $2): a rank was lost or killed, nothing to fix; requeueing SLURM job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $limit, DISCO_MAX_RESTARTS)"
  scontrol requeue "$SLURM_JOB_ID" || true  # a job SLURM already requeued (its node failed) is left as it is
}

# recipe KEY: a value of the demo recipe (recipes/demo.json): the batch scripts' defaults come from it
recipe() {
  "$PYTHON" -m disco_dist.report.recipes demo "$1"
}
