#!/usr/bin/env bash
# Poll HTTP endpoints until every one answers 2xx; fail on timeout or when a watched process dies.
#
#   slurm/wait_healthy.sh [--timeout SECONDS] [--interval SECONDS] [--pid PID]... URL...
#
#   --timeout   give up after this many seconds (default 600; model loading can be slow)
#   --interval  seconds between polls (default 1)
#   --pid       a process that must stay alive while we wait (e.g. the srun that runs
#               the servers); if it exits, waiting stops at once with status 1
#
# Prints one line per endpoint as it comes up and exits 0 when all are up;
# exits 1 on timeout or a dead --pid, naming the endpoints still down.
set -euo pipefail

timeout_s=600
interval_s=1
pids=()
urls=()
while (($#)); do
    case $1 in
        --timeout) timeout_s=$2; shift 2 ;;
        --interval) interval_s=$2; shift 2 ;;
        --pid) pids+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) urls+=("$1"); shift ;;
    esac
done
if ((${#urls[@]} == 0)); then
    echo "wait_healthy: no URL given" >&2
    exit 2
fi

started=$SECONDS
pending=("${urls[@]}")
while ((${#pending[@]})); do
    still=()
    for url in "${pending[@]}"; do
        # --noproxy: cluster proxies answer for hosts they cannot reach (THUDM/slime#1026).
        if curl --silent --fail --noproxy '*' --max-time 10 --output /dev/null "$url"; then
            echo "wait_healthy: up after $((SECONDS - started))s: $url" >&2
        else
            still+=("$url")
        fi
    done
    pending=("${still[@]+"${still[@]}"}")
    ((${#pending[@]})) || break
    for pid in "${pids[@]+"${pids[@]}"}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "wait_healthy: process $pid exited while waiting for: ${pending[*]}" >&2
            exit 1
        fi
    done
    if ((SECONDS - started >= timeout_s)); then
        echo "wait_healthy: timed out after ${timeout_s}s; still down: ${pending[*]}" >&2
        exit 1
    fi
    sleep "$interval_s"
done
