# Shared helpers of the cluster harness (sourced, not run).

die() { echo "ERROR: $*" >&2; exit 1; }

# True when nothing listens on TCP port $1 (any address).
port_free() {
    ! ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

# start_daemon NAME STATE CMD...: run CMD (which must stay in the foreground) in its own session,
# output to $STATE/NAME.out, and record "NAME PID" in $STATE/pids. setsid execs in place here (a
# background child of a script is no process-group leader), so the recorded PID is the daemon itself.
start_daemon() {
    local name=$1 state=$2
    shift 2
    setsid "$@" >"$state/$name.out" 2>&1 </dev/null &
    local pid=$!
    echo "$name $pid" >>"$state/pids"
    sleep 0.3
    kill -0 "$pid" 2>/dev/null || die "$name exited at once: $(tail -5 "$state/$name.out" 2>/dev/null)"
}

# wait_for SECONDS WHAT CMD...: retry CMD every 0.5 s until it succeeds or SECONDS pass.
wait_for() {
    local limit=$1 what=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS - t0 >= limit)); then
            die "timed out after ${limit}s waiting for: $what"
        fi
        sleep 0.5
    done
}
