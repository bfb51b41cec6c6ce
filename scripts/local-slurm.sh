#!/usr/bin/env bash
# A one-node SLURM on this machine, for trying (and testing) the cluster path of the workflow.
#
#   scripts/local-slurm.sh          bring it up (idempotent: a running one is left as it is)
#   scripts/local-slurm.sh stop     stop what this script started
#   scripts/local-slurm.sh status   say whether it is up
#
# As root on Debian/Ubuntu: installs slurm-wlm and munge with apt when they are missing, writes a
# munge key, slurm.conf and gres.conf (one node sized from `nproc` and the free memory, partitions
# `cpu` (default) and `gpu`, a stand-in GPU: Gres=gpu:1 with File=/dev/null, no accounting daemon),
# starts munged, slurmctld and slurmd, and waits until `sinfo` shows the node idle.
# Everything it writes and runs lives in $LIFLOW_SLURM_DIR (default /tmp/liflow-slurm): its own
# munged on its own socket, its own key, state, spool, logs and pid files. The SLURM clients
# (sbatch, squeue, sinfo) read /etc/slurm/slurm.conf (Debian's path for slurm 22.05) unless
# SLURM_CONF says otherwise, so /etc/slurm/slurm.conf and gres.conf are symlinks to the files of
# that directory; an /etc/slurm/slurm.conf that is not such a symlink is never touched (the script
# says so and stops). Exit status non-zero with one line saying why when it cannot run.
set -euo pipefail

DIR=${LIFLOW_SLURM_DIR:-/tmp/liflow-slurm}
ETC=/etc/slurm
NODE=$(hostname -s)
say() { echo "local-slurm: $*"; }
die() { echo "local-slurm: $*" >&2; exit 1; }

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -1; }

stop() {
    local name pidf pid
    for name in slurmd slurmctld munged; do
        pidf=$DIR/$name.pid
        if alive "$pidf"; then
            pid=$(cat "$pidf")
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
            say "stopped $name (pid $pid)"
        fi
        rm -f "$pidf"
    done
    for f in slurm.conf gres.conf; do
        if [[ -L $ETC/$f && $(readlink "$ETC/$f") == "$DIR/$f" ]]; then rm -f "$ETC/$f"; fi
    done
}

case "${1:-start}" in
    start) ;;
    stop)
        [[ $(id -u) -eq 0 ]] || die "not root: cannot stop the daemons"
        stop
        exit 0
        ;;
    status)
        st=$(node_state || true)
        if [[ $st == idle || $st == mix || $st == alloc ]]; then say "up: node $NODE $st"; exit 0; fi
        say "not up${st:+ (node $NODE: $st)}"
        exit 1
        ;;
    *) die "usage: $0 [start|stop|status]" ;;
esac

[[ $(id -u) -eq 0 ]] || die "cannot run: not root (slurmctld, slurmd and munged are started as root)"

# Already up (started by this script): nothing to do.
if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && alive "$DIR/munged.pid"; then
    st=$(node_state || true)
    if [[ $st == idle || $st == mix || $st == alloc ]]; then
        say "already up: node $NODE $st (config $DIR/slurm.conf)"
        exit 0
    fi
fi

# --- packages -------------------------------------------------------------------------------
need() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
    command -v munged >/dev/null; }
if ! need; then
    command -v apt-get >/dev/null || die "cannot run: slurm-wlm/munge are not installed and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    pkgs=(slurm-wlm munge)
    if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"${TMPDIR:-/tmp}/local-slurm-apt.log" 2>&1; then
        apt-get update -q >>"${TMPDIR:-/tmp}/local-slurm-apt.log" 2>&1 ||
            die "cannot run: apt-get update failed (see ${TMPDIR:-/tmp}/local-slurm-apt.log)"
        apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"${TMPDIR:-/tmp}/local-slurm-apt.log" 2>&1 ||
            die "cannot run: apt-get install ${pkgs[*]} failed (see ${TMPDIR:-/tmp}/local-slurm-apt.log)"
    fi
    need || die "cannot run: slurmctld/slurmd/sbatch/munged still missing after apt-get install"
fi

# --- configuration --------------------------------------------------------------------------
for f in slurm.conf gres.conf; do
    if [[ -e $ETC/$f && ! ( -L $ETC/$f && $(readlink "$ETC/$f") == "$DIR/$f" ) ]]; then
        die "cannot run: $ETC/$f exists and is not this script's (a SLURM is configured here already)"
    fi
done
stop >/dev/null # leftovers of an earlier, half-started run
mkdir -p "$DIR"/{munge,state,spool,log} "$ETC"
chmod 0755 "$DIR"
chmod 0700 "$DIR/munge"

CPUS=$(nproc)
# RealMemory: 90 % of the memory available now (MiB), so slurmd never finds less than configured
MEM=$(awk '/^MemAvailable:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
[[ $MEM -gt 500 ]] || die "cannot run: only ${MEM} MiB of memory available"

if [[ ! -s $DIR/munge/munge.key ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 0400 "$DIR/munge/munge.key"

cat >"$DIR/slurm.conf" <<EOF
# Written by liflow-screen scripts/local-slurm.sh: one node ($CPUS CPUs, $MEM MiB), partitions cpu
# and gpu, a stand-in GPU, no accounting (sacct cannot answer: use squeue as status command).
ClusterName=liflow
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
ReturnToService=2
# jobs run at the niceness of the command that submitted them (nice snakemake ... as without SLURM)
PropagatePrioProcess=1
MinJobAge=600
MaxArraySize=10001
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
cat >"$DIR/gres.conf" <<EOF
# stand-in GPU: scheduling only (jobs asking for gpu:1 land on partition gpu), no device
NodeName=$NODE Name=gpu File=/dev/null
EOF
ln -sfn "$DIR/slurm.conf" "$ETC/slurm.conf"
ln -sfn "$DIR/gres.conf" "$ETC/gres.conf"

# --- daemons --------------------------------------------------------------------------------
munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed" ||
    die "cannot run: munged did not start (see $DIR/log/munged.log)"
slurmctld -c -f "$DIR/slurm.conf" || die "cannot run: slurmctld did not start (see $DIR/log/slurmctld.log)"
slurmd -f "$DIR/slurm.conf" -N "$NODE" || die "cannot run: slurmd did not start (see $DIR/log/slurmd.log)"

for _ in $(seq 120); do
    st=$(node_state || true)
    if [[ $st == idle ]]; then
        say "up: node $NODE idle, $CPUS CPUs, $MEM MiB, partitions cpu (default) and gpu (gres gpu:1); config $DIR/slurm.conf"
        exit 0
    fi
    sleep 0.5
done
die "cannot run: node $NODE not idle after 60 s (state '${st:-none}'; logs in $DIR/log)"
