# ==== ling-slurm launch logic (megatron_ling/launch/templates/train_body.sh; the same in every job) ====
# Needs: RUN_DIR RECIPE OVERRIDES LAUNCHER NNODES PROCS_PER_NODE CPUS_PER_TASK MAX_RESTARTS PYTHON
#        ENTRY_MODULE CONTAINER_ARGS (set above).
# Not `set -e`: after the training step fails or stops, this script must still decide about requeueing.
set -uo pipefail

RESTART=${SLURM_RESTART_COUNT:-0}
CONTROL_DIR="$RUN_DIR/control"
mkdir -p "$CONTROL_DIR"
# Stop request (polled by the trainer every step on every node: the run dir is on a shared filesystem)
# and the trainer's verdict (rank 0 writes {"reason": ..., "iteration": N} before exiting).
export LING_STOP_FILE="$CONTROL_DIR/stop-$SLURM_JOB_ID"
export LING_EXIT_FILE="$CONTROL_DIR/exit-$SLURM_JOB_ID-$RESTART.json"
rm -f "$LING_STOP_FILE" "$LING_EXIT_FILE"

log() { echo "[ling-slurm $(date -u +%FT%TZ)] $*"; }

# The warning signal (--signal=B:USR1@T before the time limit, `scancel --batch -s USR1 JOB`, or the
# SIGTERM of a preemption) reaches this shell. Asking for a stop = creating the stop file; the trainer
# then finishes its step, saves a checkpoint and exits 0 with reason "preempted".
request_stop() { log "received SIG$1: asking the trainer to finish its step, checkpoint and stop"; touch "$LING_STOP_FILE"; }
trap 'request_stop USR1' USR1
trap 'request_stop USR2' USR2
trap 'request_stop TERM' TERM

# Rendezvous on the first node of the allocation. A port derived from the job id keeps two jobs that
# share a node apart; export MASTER_PORT before sbatch to choose one.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT NNODES PROCS_PER_NODE
log "job $SLURM_JOB_ID (restart $RESTART of at most $MAX_RESTARTS) on $SLURM_JOB_NODELIST:" \
    "$NNODES node(s) x $PROCS_PER_NODE process(es), launcher $LAUNCHER, rendezvous $MASTER_ADDR:$MASTER_PORT"

SRUN=(srun --nodes="$NNODES" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 ${CONTAINER_ARGS[@]+"${CONTAINER_ARGS[@]}"})
TRAIN=(-m "$ENTRY_MODULE" --config "$RECIPE" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
if [ "$LAUNCHER" = torchrun ]; then
    # One task per node runs torchrun; the agents meet in a c10d rendezvous hosted by node 0
    # (is_host is explicit: on hosts with several names the hostname heuristic can pick none or two).
    # USR1/USR2 are ignored by the agent (the ignore survives exec), so a step-level USR1 reaches the
    # training processes (they install their own handler) instead of killing torchrun. The reaper
    # ends processes a killed trainer leaves behind (see megatron_ling/launch/reaper.py).
    STEP=("${SRUN[@]}" --ntasks-per-node=1 bash -c '
        trap "" USR1 USR2
        if [ "$SLURM_NODEID" = 0 ]; then is_host=1; else is_host=0; fi
        echo "[ling-slurm] node $SLURMD_NODENAME (node id $SLURM_NODEID): torchrun with $PROCS_PER_NODE process(es)"
        exec "$0" -m megatron_ling.launch.reaper -- "$0" -m torch.distributed.run \
            --nnodes="$NNODES" --nproc-per-node="$PROCS_PER_NODE" \
            --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
            --rdzv-conf="is_host=$is_host" --max-restarts=0 "$@"' "$PYTHON" "${TRAIN[@]}")
else
    # One task per process; Slurm's task ids become torch.distributed's rank variables.
    STEP=("${SRUN[@]}" --ntasks-per-node="$PROCS_PER_NODE" bash -c '
        export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
        export LOCAL_WORLD_SIZE=$PROCS_PER_NODE NODE_RANK=$SLURM_NODEID GROUP_RANK=$SLURM_NODEID
        trap "" USR1 USR2
        exec "$0" -m megatron_ling.launch.reaper -- "$0" "$@"' "$PYTHON" "${TRAIN[@]}")
fi

# Run the step in the background so the traps above run while it trains (bash defers traps until
# the foreground command ends); its exit status goes through a file because `wait` also returns
# early, with 128+signal, whenever a trapped signal arrives.
STEP_RC_FILE="$CONTROL_DIR/step-rc-$SLURM_JOB_ID-$RESTART"
rm -f "$STEP_RC_FILE"
( "${STEP[@]}"; echo $? > "$STEP_RC_FILE" ) &
STEP_PID=$!
while kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID"; done
rc=$(cat "$STEP_RC_FILE" 2>/dev/null || echo 1)

reason=$(sed -n 's/.*"reason"[[:space:]]*:[[:space:]]*"\([a-z_]*\)".*/\1/p' "$LING_EXIT_FILE" 2>/dev/null | head -n 1)
iteration=$(sed -n 's/.*"iteration"[[:space:]]*:[[:space:]]*\([0-9]*\).*/\1/p' "$LING_EXIT_FILE" 2>/dev/null | head -n 1)
log "training step exited with status $rc; trainer reported reason=${reason:-none} iteration=${iteration:-?}"

if [ "$rc" = 0 ] && [ "$reason" = completed ]; then
    log "training completed"
    exit 0
fi
if [ "$rc" = 0 ] && [ "$reason" = preempted ]; then
    if [ -e "$CONTROL_DIR/no-requeue-$SLURM_JOB_ID" ]; then
        log "stopped on request with a checkpoint at iteration $iteration; not requeued (continue with: ling-slurm resubmit $RUN_DIR)"
        exit 0
    fi
    if [ "$RESTART" -lt "$MAX_RESTARTS" ]; then
        log "checkpoint at iteration $iteration; requeueing (restart $((RESTART + 1)) of at most $MAX_RESTARTS)"
        # Ends this run (Slurm cancels the running batch script as part of the requeue).
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        log "error: scontrol requeue $SLURM_JOB_ID failed; continue with: ling-slurm resubmit $RUN_DIR"
        exit 1
    fi
    log "checkpoint at iteration $iteration but --max-restarts $MAX_RESTARTS is used up; continue with: ling-slurm resubmit $RUN_DIR"
    exit 75
fi
# Anything else is a failure (crash, kill, bad config): never requeued, Slurm records it as FAILED.
log "training failed (status $rc, reason ${reason:-none}); not requeued"
[ "$rc" = 0 ] && rc=1
exit "$rc"
