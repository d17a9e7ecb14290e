#!/usr/bin/env bash
# Install single-node SLURM + Grid Engine from the Debian packages (Debian 12: SLURM 22.05, Grid Engine 8.1.9).
#
# Exit codes: 0 installed (or already there); 3 = cannot install here (not root, no apt-get, no package
# index / network) -- the pytest wrapper turns 3 into a skip with the printed reason; anything else = a
# real failure. Daemons are NOT started: a temporary policy-rc.d (only if none exists) keeps the package
# scripts from launching slurmctld/slurmd/munged/sge_*/exim4, so the harness starts exactly what it stops.
set -euo pipefail

PKGS=(slurmctld slurmd slurm-client munge gridengine-master gridengine-exec gridengine-client)
BINS=(slurmctld slurmd sbatch squeue scontrol munged sge_qmaster sge_execd qsub qstat qacct qconf)

cant() { echo "CANNOT-INSTALL: $*"; exit 3; }

have_all() {
    local b
    for b in "${BINS[@]}"; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
    done
    [ -d /var/lib/gridengine/default/common ] || return 1
}

# The harness starts daemons as root (munged as the munge user via setpriv, SGE jobs of root allowed).
[ "$(id -u)" = 0 ] || cant "not root (uid $(id -u)): installing ${PKGS[*]} and starting their daemons needs root"

if have_all; then
    echo "already installed: ${PKGS[*]}"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || cant "no apt-get (not a Debian/Ubuntu machine)"

host=$(hostname -s)
# Grid Engine's postinst creates the cell 'default' with this host as qmaster when preseeded.
for p in gridengine-common gridengine-master gridengine-client gridengine-exec; do
    printf '%s shared/gridengineconfig boolean true\n%s shared/gridenginecell string default\n%s shared/gridenginemaster string %s\n' \
        "$p" "$p" "$p" "$host"
done | debconf-set-selections

made_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# temporary, written by cfaudit tests/cluster/install.sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends "${PKGS[@]}" >/tmp/cfaudit-cluster-apt.log 2>&1; then
    # Stale or missing package lists: refresh once (needs the network).
    if ! apt-get update -q >>/tmp/cfaudit-cluster-apt.log 2>&1; then
        cant "apt-get update failed (no network or no package mirror); see /tmp/cfaudit-cluster-apt.log"
    fi
    if ! apt-get install -y -q --no-install-recommends "${PKGS[@]}" >>/tmp/cfaudit-cluster-apt.log 2>&1; then
        if grep -qE "Unable to locate package|has no installation candidate|Could not resolve|Temporary failure" /tmp/cfaudit-cluster-apt.log; then
            cant "packages not available from the configured apt sources; see /tmp/cfaudit-cluster-apt.log"
        fi
        echo "apt-get install failed; see /tmp/cfaudit-cluster-apt.log" >&2
        tail -20 /tmp/cfaudit-cluster-apt.log >&2
        exit 1
    fi
fi
have_all || { echo "installed ${PKGS[*]} but some binaries are missing" >&2; exit 1; }
echo "installed: ${PKGS[*]}"
