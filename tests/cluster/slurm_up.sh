#!/usr/bin/env bash
# Start a private single-node SLURM on loopback: munged + slurmctld + slurmd, all in the foreground of
# their own process (PIDs recorded in $STATE/pids, one "name pid" a line, for down.sh to stop exactly
# these). Everything (slurm.conf, gres.conf, munge key/socket, spool, logs) lives in $STATE; clients find
# it through SLURM_CONF=$STATE/slurm/slurm.conf.
#
# The node: this host at 127.0.0.1, 4 CPUs (config_overrides: more than the 2 real cores, so a rule's
# threads above the submit host's core count can be checked), 8000 MB, one FAKE GPU (gres gpu:1,
# File=/dev/null: slurmd needs a File= or it drops the GPU and drains the node). Partitions 'cpu'
# (default) and 'gpu'. No slurmdbd: sacct does not work, so the profile's status method must not rely
# on it (MinJobAge=300 lets the slurm plugin trust squeue).
set -euo pipefail
STATE=${1:?usage: slurm_up.sh STATE_DIR}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

host=$(hostname -s)
CTLD_PORT=${CFAUDIT_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${CFAUDIT_SLURMD_PORT:-6818}
port_free "$CTLD_PORT" || die "port $CTLD_PORT (slurmctld) is in use: is another SLURM running? set CFAUDIT_SLURMCTLD_PORT"
port_free "$SLURMD_PORT" || die "port $SLURMD_PORT (slurmd) is in use: set CFAUDIT_SLURMD_PORT"

S=$STATE/slurm
M=$STATE/munge
mkdir -p "$S/ctld" "$S/d" "$M"
chmod 755 "$STATE" "$S"

# --- munge: own key + socket, run as the munge user (munged refuses root-owned, group-writable paths)
dd if=/dev/urandom of="$M/munge.key" bs=1 count=1024 status=none
chown -R munge:munge "$M"
chmod 700 "$M"
chmod 400 "$M/munge.key"
start_daemon munged "$STATE" setpriv --reuid=munge --regid=munge --init-groups \
    /usr/sbin/munged --foreground --force --socket="$M/munge.socket" --key-file="$M/munge.key" \
    --pid-file="$M/munged.pid" --log-file="$M/munged.log" --seed-file="$M/munged.seed"
wait_for 20 "munge socket" test -S "$M/munge.socket"
wait_for 20 "munge round trip" sh -c "munge -S '$M/munge.socket' -n | unmunge -S '$M/munge.socket' >/dev/null"

cat > "$S/slurm.conf" <<EOF
ClusterName=cfaudit
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$M/munge.socket
CredType=cred/munge
StateSaveLocation=$S/ctld
SlurmdSpoolDir=$S/d
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/slurmctld.log
SlurmdLogFile=$S/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
GresTypes=gpu
MpiDefault=none
ReturnToService=2
MinJobAge=300
KillWait=5
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=4 RealMemory=8000 Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
EOF
echo "NodeName=$host Name=gpu File=/dev/null" > "$S/gres.conf"
export SLURM_CONF=$S/slurm.conf
# The slurm plugin's job step strips every SLURM_* variable (SLURM_CONF too) before its inner `srun`,
# which then reads the default /etc/slurm/slurm.conf: point that at ours for the harness's lifetime
# (down.sh removes the link; an existing real config is never touched).
if [ -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then
    [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$S/slurm.conf" ] ||
        die "/etc/slurm/slurm.conf exists (a real SLURM here?): this harness will not replace it"
else
    mkdir -p /etc/slurm
    ln -s "$S/slurm.conf" /etc/slurm/slurm.conf
    echo /etc/slurm/slurm.conf >>"$STATE/links"
fi

start_daemon slurmctld "$STATE" /usr/sbin/slurmctld -D -i -f "$S/slurm.conf"
wait_for 30 "slurmctld answers" scontrol ping
start_daemon slurmd "$STATE" /usr/sbin/slurmd -D -f "$S/slurm.conf"
wait_for 40 "node $host idle" sh -c "sinfo -h -N -n '$host' -o %T | grep -qx idle"

# smoke: a GPU job runs, sees the fake GPU, and finishes
jid=$(sbatch --parsable -p gpu --gpus=1 -t 1 -o "$S/smoke.out" --wrap 'echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"')
wait_for 40 "smoke job $jid completed" sh -c "squeue -h -j $jid --states=all -o %T | grep -qx COMPLETED"
grep -q "CUDA_VISIBLE_DEVICES=0" "$S/smoke.out" || die "smoke GPU job did not see CUDA_VISIBLE_DEVICES=0: $(cat "$S/smoke.out")"
echo "SLURM up: SLURM_CONF=$S/slurm.conf (node $host, partitions cpu gpu, gres gpu:1 fake)"
