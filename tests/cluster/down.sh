#!/usr/bin/env bash
# Stop exactly the daemons up-scripts started: the PIDs in $STATE/pids, newest first (slurmd before
# slurmctld before munged; sge_execd before sge_qmaster). Jobs still queued in these private schedulers
# are cancelled first so no job process outlives its daemon. SIGTERM, then SIGKILL after 20 s.
set -uo pipefail
STATE=${1:?usage: down.sh STATE_DIR}
[ -f "$STATE/pids" ] || { echo "nothing to stop ($STATE/pids absent)"; exit 0; }

# alive PID: the process exists and is not a zombie (an unreaped exited daemon counts as stopped)
alive() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
running() { grep -q "^$1 " "$STATE/pids" && alive "$(awk -v n="$1" '$1==n {print $2}' "$STATE/pids" | tail -1)"; }

if running slurmctld && [ -f "$STATE/slurm/slurm.conf" ]; then
    SLURM_CONF=$STATE/slurm/slurm.conf timeout 10 scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
fi
if running sge_qmaster && [ -f "$STATE/sge/env.sh" ]; then
    # shellcheck disable=SC1091
    (. "$STATE/sge/env.sh" && timeout 10 qdel -f -u '*' >/dev/null 2>&1) || true
fi

rc=0
while read -r name pid; do
    [ -n "${pid:-}" ] || continue
    if ! alive "$pid"; then
        echo "$name ($pid) already gone"
        continue
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do alive "$pid" || break; sleep 0.5; done
    if alive "$pid"; then
        echo "$name ($pid) ignored SIGTERM for 20 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    if alive "$pid"; then echo "ERROR: $name ($pid) still running" >&2; rc=1; continue; fi
    echo "stopped $name ($pid)"
done < <(tac "$STATE/pids")
# Links up-scripts made in system paths (only if they still point into $STATE).
if [ -f "$STATE/links" ]; then
    while read -r link; do
        case "$(readlink "$link" 2>/dev/null)" in
            "$STATE"/*) rm -f "$link" && echo "removed link $link" ;;
        esac
    done <"$STATE/links"
    mv "$STATE/links" "$STATE/links.removed"
fi
[ "$rc" = 0 ] && mv "$STATE/pids" "$STATE/pids.stopped"
exit "$rc"
