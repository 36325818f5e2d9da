# Sourced by slurm/colocated.sbatch and slurm/disaggregated.sbatch (after `cd "$GPPO_DIR"`,
# with RUN_DIR set): per-attempt logs and the preemption protocol they share.
#
# Slurm sends USR1 to the batch shell before the time limit (#SBATCH --signal=B:USR1@300).
# The trap creates RUN_DIR/PREEMPT (the trainer's train.stop_file); the trainer checkpoints
# at its next step boundary and exits 0, and `requeue_if_preempted` requeues the job, which
# resumes from that checkpoint. If the trainer ($trainer_pid, set by the caller) is still
# running PREEMPT_GRACE_S (240) seconds after the signal, the job is requeued anyway.
# Sets: attempt, LOG_DIR (LOG_ROOT/<job id>/attempt-<n>, default LOG_ROOT RUN_DIR/slurm-logs).

attempt=${SLURM_RESTART_COUNT:-0}
LOG_DIR=$(realpath -m "${LOG_ROOT:-$RUN_DIR/slurm-logs}")/$SLURM_JOB_ID/attempt-$attempt
mkdir -p "$LOG_DIR"
# A marker left by the previous attempt would stop this one at its first step.
rm -f "$RUN_DIR/PREEMPT"
trainer_pid=
watchdog_pid=

on_usr1() {
    echo "$(date -Is) USR1: asking the trainer to checkpoint and stop (marker $RUN_DIR/PREEMPT)"
    touch "$RUN_DIR/PREEMPT"
    [[ -n $watchdog_pid ]] && return
    # Requeue even if the trainer does not stop in time; it resumes from its last checkpoint.
    (sleep "${PREEMPT_GRACE_S:-240}"
     if kill -0 "$trainer_pid" 2>/dev/null; then
         echo "$(date -Is) trainer still running after ${PREEMPT_GRACE_S:-240}s; requeueing now"
         scontrol requeue "$SLURM_JOB_ID"
     fi) &
    watchdog_pid=$!
}
trap on_usr1 USR1

# Once the trainer has exited the watchdog has nothing to guard. Left alone it would outlive
# the job (Slurm's proctrack/linuxproc loses re-parented processes) and sleep on.
stop_watchdog() {
    [[ -n $watchdog_pid ]] || return 0
    # Both fail once the watchdog has already run out; the launchers' `set -e` must not exit on that.
    pkill -P "$watchdog_pid" 2>/dev/null || true  # its sleep
    kill "$watchdog_pid" 2>/dev/null || true
    watchdog_pid=
}

# $1: the trainer's exit status. A trainer that stopped for preemption exits 0.
requeue_if_preempted() {
    stop_watchdog
    if [[ -e $RUN_DIR/PREEMPT && $1 -eq 0 && ${REQUEUE:-1} == 1 ]]; then
        echo "$(date -Is) stopped for preemption; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
}
