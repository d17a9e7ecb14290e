#!/usr/bin/env bash
# Start a single-node Grid Engine 8.1.9 (the Debian cell 'default' under /var/lib/gridengine) on loopback:
# sge_qmaster + sge_execd in the foreground (SGE_ND=1) of their own session, PIDs recorded in
# $STATE/pids for down.sh. Configured like BU SCC where the pipeline's profile relies on it:
#   - parallel environment 'omp' (allocation_rule $pe_slots) -> -pe omp N
#   - complexes: gpus (INT, consumable per JOB, so -pe omp 2 -l gpus=1 asks for ONE gpu), gpu_c (DOUBLE,
#     relop <=: "-l gpu_c=8.0" means capability >= 8.0), gpu_memory and mem_per_core (MEMORY, <=)
#   - the exec host offers a FAKE GPU: gpus=1, gpu_c=8.6, gpu_memory=48G, mem_per_core=8G; 4 slots
#   - project 'cfaudit_test' (-P), jobs of root allowed (min_uid/min_gid 0), 1 s scheduling interval,
#     accounting flushed at once (qacct sees a job as soon as it ends)
# Client settings for tests: $STATE/sge/env.sh (SGE_ROOT, SGE_CELL).
set -euo pipefail
STATE=${1:?usage: sge_up.sh STATE_DIR}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
[ -f "$SGE_ROOT/$SGE_CELL/common/act_qmaster" ] || die "no Grid Engine cell at $SGE_ROOT/$SGE_CELL (run install.sh)"
host=$(hostname -s)
port_free 6444 || die "port 6444 (sge_qmaster) is in use: is another Grid Engine running?"
port_free 6445 || die "port 6445 (sge_execd) is in use: is another Grid Engine running?"

G=$STATE/sge
mkdir -p "$G/conf"
chmod 755 "$STATE"
printf 'export SGE_ROOT=%s SGE_CELL=%s\n' "$SGE_ROOT" "$SGE_CELL" >"$G/env.sh"

# The qmaster refuses clients until 'localhost' (what 127.0.0.1 resolves back to) maps onto this host.
echo "$host localhost" >"$SGE_ROOT/$SGE_CELL/common/host_aliases"
echo "$host" >"$SGE_ROOT/$SGE_CELL/common/act_qmaster"

cd "$G"  # the daemons' working directory (they write nothing here)
SGE_ND=1 start_daemon sge_qmaster "$STATE" /usr/sbin/sge_qmaster
wait_for 30 "sge_qmaster answers" qconf -sh

# Retry wrapper: right after (re)configuration the qmaster may answer "Error reading answer list".
q() { local i; for i in 1 2 3 4 5; do "$@" && return 0; sleep 1; done; die "failed 5 times: $*"; }

# --- global configuration: root may submit; quick load reports; accounting written at once
qconf -sconf global | awk '{ if (sub(/\\$/, "")) { buf = buf $0; next } print buf $0; buf = "" }' |
    sed -E -e 's/^min_uid .*/min_uid 0/' -e 's/^min_gid .*/min_gid 0/' \
        -e 's/^load_report_time .*/load_report_time 00:00:05/' \
        -e 's/^reporting_params .*/reporting_params accounting=true reporting=false flush_time=00:00:01 joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00/' \
        >"$G/conf/global"
(cd "$G/conf" && q qconf -Mconf global >/dev/null)   # -Mconf takes the configuration's name as file name
qconf -ssconf | sed -E -e 's/^schedule_interval .*/schedule_interval 0:0:1/' \
    -e 's/^flush_submit_sec .*/flush_submit_sec 1/' -e 's/^flush_finish_sec .*/flush_finish_sec 1/' >"$G/sconf"
q qconf -Msconf "$G/sconf" >/dev/null

# --- SCC-like complexes (added once; the spool keeps them)
qconf -sc >"$G/complexes"
for line in "gpus gpus INT <= YES JOB 0 0" "gpu_c gpu_c DOUBLE <= YES NO 0 0" \
    "gpu_memory gpu_memory MEMORY <= YES NO 0 0" "mem_per_core mem_per_core MEMORY <= YES NO 0 0"; do
    name=${line%% *}
    sed -i -E "/^$name /d" "$G/complexes"
    echo "$line" >>"$G/complexes"
done
q qconf -Mc "$G/complexes" >/dev/null

# --- hosts, parallel environment, project, queue (add, or modify when the spool has them already)
qconf -sh 2>/dev/null | grep -qx "$host" || q qconf -ah "$host" >/dev/null
qconf -ss 2>/dev/null | grep -qx "$host" || q qconf -as "$host" >/dev/null

cat >"$G/pe" <<'EOF'
pe_name            omp
slots              9999
user_lists         NONE
xuser_lists        NONE
start_proc_args    NONE
stop_proc_args     NONE
allocation_rule    $pe_slots
control_slaves     FALSE
job_is_first_task  TRUE
urgency_slots      min
accounting_summary FALSE
qsort_args         NONE
EOF
if qconf -spl 2>/dev/null | grep -qx omp; then q qconf -Mp "$G/pe" >/dev/null; else q qconf -Ap "$G/pe" >/dev/null; fi

cat >"$G/exechost" <<EOF
hostname              $host
load_scaling          NONE
complex_values        gpus=1,gpu_c=8.6,gpu_memory=48G,mem_per_core=8G
user_lists            NONE
xuser_lists           NONE
projects              NONE
xprojects             NONE
usage_scaling         NONE
report_variables      NONE
EOF
if qconf -sel 2>/dev/null | grep -qx "$host"; then q qconf -Me "$G/exechost" >/dev/null; else q qconf -Ae "$G/exechost" >/dev/null; fi

printf 'name cfaudit_test\noticket 0\nfshare 0\nacl NONE\nxacl NONE\n' >"$G/project"
qconf -sprjl 2>/dev/null | grep -qx cfaudit_test || q qconf -Aprj "$G/project" >/dev/null

{
    printf 'qname all.q\nhostlist %s\nseq_no 0\nload_thresholds NONE\nsuspend_thresholds NONE\n' "$host"
    printf 'nsuspend 1\nsuspend_interval 00:05:00\npriority 0\nmin_cpu_interval 00:05:00\n'
    printf 'processors UNDEFINED\nqtype BATCH INTERACTIVE\nckpt_list NONE\npe_list omp\nrerun FALSE\n'
    printf 'slots 4\ntmpdir /tmp\nshell /bin/bash\nprolog NONE\nepilog NONE\nshell_start_mode unix_behavior\n'
    printf 'starter_method NONE\nsuspend_method NONE\nresume_method NONE\nterminate_method NONE\n'
    printf 'notify 00:00:60\nowner_list NONE\nuser_lists NONE\nxuser_lists NONE\nsubordinate_list NONE\n'
    printf 'complex_values NONE\nprojects NONE\nxprojects NONE\ncalendar NONE\ninitial_state default\n'
    for lim in s_rt h_rt s_cpu h_cpu s_fsize h_fsize s_data h_data s_stack h_stack s_core h_core s_rss h_rss s_vmem h_vmem; do
        printf '%s INFINITY\n' "$lim"
    done
} >"$G/queue"
if qconf -sql 2>/dev/null | grep -qx all.q; then q qconf -Mq "$G/queue" >/dev/null; else q qconf -Aq "$G/queue" >/dev/null; fi

SGE_ND=1 start_daemon sge_execd "$STATE" /usr/sbin/sge_execd
wait_for 40 "exec host $host reports load" sh -c "qhost -h '$host' | awk 'NR>3 && \$1==\"$host\" && \$7 != \"-\" {ok=1} END {exit !ok}'"
q qmod -e "all.q@$host" >/dev/null

# smoke: a 2-slot GPU job with the SCC request shape runs and is accounted
jid=$(echo 'echo "NSLOTS=$NSLOTS"' | qsub -terse -cwd -j y -o "$G/smoke.out" -P cfaudit_test -pe omp 2 \
    -l h_rt=0:01:00,mem_per_core=1G,gpus=1,gpu_c=8.0)
wait_for 60 "smoke job $jid accounted" sh -c "qacct -j $jid | grep -q '^exit_status *0'"
grep -q "NSLOTS=2" "$G/smoke.out" || die "smoke job did not get 2 slots: $(cat "$G/smoke.out")"
echo "Grid Engine up: SGE_ROOT=$SGE_ROOT (host $host, queue all.q 4 slots, pe omp, fake gpus=1 gpu_c=8.6)"
