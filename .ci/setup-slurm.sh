#!/usr/bin/env bash
# A one-node SLURM on this machine, for tests/test_slurm.py (CI runs it before the tests).
# Needs root and Debian's packages; no systemd: the daemons are started directly. Idempotent:
# installs only what is missing, keeps an existing munge key, restarts nothing that is running.
#   sudo .ci/setup-slurm.sh        # then: sinfo shows the node "idle"
# One node (127.0.0.1, every core), one default partition, proctrack/linuxproc, task/none,
# no accounting. The daemons log harmless PMIx and MailProg errors to /var/log/slurm/.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "setup-slurm: needs root" >&2
    exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge: a key only root and munge read, munged running as the munge user
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! pgrep -u munge -x munged >/dev/null; then
    su -s /bin/sh munge -c /usr/sbin/munged
fi

# slurm.conf: this machine's name, every core
host=$(hostname -s)
cpus=$(nproc)
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
conf=$(cat <<EOF
# written by .ci/setup-slurm.sh
ClusterName=volref-ci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
if [ ! -f /etc/slurm/slurm.conf ] || [ "$conf" != "$(cat /etc/slurm/slurm.conf)" ]; then
    printf '%s\n' "$conf" > /etc/slurm/slurm.conf
fi

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 1 150); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -n 1)
    case "$state" in
        idle|mix|alloc) echo "setup-slurm: node $host $state ($cpus CPUs)"; exit 0 ;;
        down*|drain*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
done
echo "setup-slurm: the node did not come up (sinfo: ${state:-nothing}); see /var/log/slurm/" >&2
exit 1
