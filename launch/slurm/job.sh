# Sourced by launch/slurm/*.sbatch: what every msmedcap job does with its allocation.
#
# Ranks are started by `srun`, one task per rank (= per GPU), not by DeepSpeed's launcher:
#  - srun needs no ssh/pdsh between nodes, and SLURM tracks, accounts and cleans up every rank;
#  - a signal sent through SLURM reaches the ranks themselves. DeepSpeed's launcher would sit between
#    them and die of SIGUSR1 (it handles only INT and TERM), taking the ranks down unsaved.
# Each task maps SLURM's ids to torch.distributed's variables (RANK, LOCAL_RANK, WORLD_SIZE,
# MASTER_ADDR, MASTER_PORT); deepspeed.init_distributed reads them as if its launcher had set them.

MSMEDCAP_ROOT=${MSMEDCAP_ROOT:-$SLURM_SUBMIT_DIR}  # sbatch runs a copy of the script: find the checkout
PYTHON=${PYTHON:-python}

# msmedcap_setup: the run dir and the rendezvous. The run dir is $RUN_DIR, else
# runs/slurm-$SLURM_JOB_ID: a requeued job keeps its SLURM_JOB_ID, so it comes back to the same dir.
# The job's log goes to $RUN_DIR/job.log (appended).
msmedcap_setup() {
    RUN_DIR=${RUN_DIR:-runs/slurm-$SLURM_JOB_ID}
    mkdir -p "$RUN_DIR"
    echo "msmedcap: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: log in $RUN_DIR/job.log"
    exec >>"$RUN_DIR/job.log" 2>&1

    local nodes
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    # Node names need not resolve (e.g. n1, n2 on one host): rendezvous at the first node's NodeAddr.
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "${nodes[0]}" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')}
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    # One thread per allocated core, not one per core of the machine, for every rank.
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export RUN_DIR MASTER_ADDR MASTER_PORT OMP_NUM_THREADS
    # srun of SLURM 22.05 to 23.02 does not inherit sbatch's --cpus-per-task: each rank would get one core.
    [[ -z ${SLURM_CPUS_PER_TASK:-} ]] || export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    echo "=== $(date -u +%FT%TZ) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}:" \
         "${SLURM_NTASKS:-$SLURM_JOB_NUM_NODES} ranks on ${nodes[*]}, rendezvous $MASTER_ADDR:$MASTER_PORT"
}

# Signals reaching this shell: USR1 (time limit near, see `--signal=B:USR1@...`) and TERM. The
# name is kept in MSMEDCAP_SIGNAL and, while the ranks run, passed on to them through srun.
MSMEDCAP_SIGNAL=
MSMEDCAP_RANKS_PID=
msmedcap_on_signal() {
    MSMEDCAP_SIGNAL=$1
    if [[ -n $MSMEDCAP_RANKS_PID ]]; then
        echo "msmedcap: SIG$1: ranks checkpoint and stop"
        kill -s "$1" "$MSMEDCAP_RANKS_PID" 2>/dev/null || true
    fi
}
trap 'msmedcap_on_signal USR1' USR1
trap 'msmedcap_on_signal TERM' TERM

# msmedcap_srun CMD...: run CMD once per rank and wait until all have ended.
msmedcap_srun() {
    local rc
    if [[ -n $MSMEDCAP_SIGNAL ]]; then
        echo "msmedcap: SIG$MSMEDCAP_SIGNAL before the ranks started: not starting them"
        return 0
    fi
    srun --kill-on-bad-exit=1 bash -c \
        'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"' rank "$@" &
    MSMEDCAP_RANKS_PID=$!
    [[ -z $MSMEDCAP_SIGNAL ]] || msmedcap_on_signal "$MSMEDCAP_SIGNAL"  # came while srun started
    # `wait` returns early when a trapped signal arrives: wait again until srun has really ended.
    while :; do
        wait "$MSMEDCAP_RANKS_PID" && rc=0 || rc=$?
        kill -0 "$MSMEDCAP_RANKS_PID" 2>/dev/null || break
    done
    MSMEDCAP_RANKS_PID=
    echo "msmedcap: ranks ended with status $rc"
    return "$rc"
}

# msmedcap_training_finished: true when the trainer's summary.json says no stage was stopped early.
msmedcap_training_finished() {
    "$PYTHON" - "$RUN_DIR/summary.json" <<'PY'
import json, sys
try:
    stages = json.load(open(sys.argv[1]))["stages"]
except (OSError, ValueError, KeyError):
    sys.exit(1)
sys.exit(any(s.get("stopped_by") for s in stages))
PY
}

# msmedcap_requeue: put this job back in the queue (same job id, so same run dir); it restarts
# from the top with SLURM_RESTART_COUNT incremented. SLURM ends this shell right after.
msmedcap_requeue() {
    echo "msmedcap: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
}
