#!/usr/bin/env bash
# Stop the cluster setup.sh started under STATE_DIR: cancel its jobs, then kill each daemon by its PID.
#
#   .ci/slurm/stop.sh STATE_DIR
set -uo pipefail

STATE=${1:?usage: stop.sh STATE_DIR}
[[ -f $STATE/pids ]] || exit 0
export SLURM_CONF=$STATE/etc/slurm.conf

# jobs first, so that no slurmstepd outlives slurmd
if scancel --full --quiet --partition=debug 2>/dev/null; then
    for _ in $(seq 50); do
        [[ -z $(squeue -h -t pending,running,completing -o %i 2>/dev/null) ]] && break
        sleep 0.2
    done
fi

alive() { # a daemon that exited but was not reaped yet (a zombie) counts as gone
    [[ -r /proc/$1/stat ]] && [[ $(cut -d')' -f2 "/proc/$1/stat" | awk '{print $1}') != Z ]]
}

# reverse start order: slurmd, slurmctld, slurmdbd, mariadbd, munged
tac "$STATE/pids" | while read -r name pid; do
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        echo "$name ($pid) ignored SIGTERM for 10 s: SIGKILL" >&2
        kill -KILL "$pid"
    fi
done
mv "$STATE/pids" "$STATE/pids.stopped"
if [[ -f $STATE/default-conf-link ]]; then
    link=$(cat "$STATE/default-conf-link")
    [[ $(readlink "$link") == "$STATE/etc/slurm.conf" ]] && rm "$link"
    rm "$STATE/default-conf-link"
fi
