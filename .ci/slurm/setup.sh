#!/usr/bin/env bash
# Start a single-node Slurm cluster under STATE_DIR, as root, without systemd:
# munged, MariaDB + slurmdbd (accounting), slurmctld, slurmd with one fake GPU (gres.conf File=/dev/null).
# It writes under STATE_DIR, plus a link /etc/slurm/slurm.conf -> STATE_DIR/etc/slurm.conf through
# which clients find the cluster. Daemon PIDs go to STATE_DIR/pids, which stop.sh kills one by one.
#
#   .ci/slurm/setup.sh STATE_DIR     (~25 s; installs the Debian packages first if they are missing)
set -euo pipefail

fail() {
    echo "error: $*" >&2
    exit 1
}

STATE=${1:?usage: setup.sh STATE_DIR}
[[ $(id -u) == 0 ]] || fail "the Slurm test cluster needs root (daemons, munge key, apt-get)"

mkdir -p "$STATE/log"
STATE=$(cd "$STATE" && pwd)
APT_LOG=$STATE/log/apt.log

PACKAGES=(slurmd slurmctld slurmdbd slurm-client munge mariadb-server)
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v munged >/dev/null ||
    ! command -v mariadbd >/dev/null; then
    command -v apt-get >/dev/null || fail "apt-get not found: install ${PACKAGES[*]} by hand"
    echo "installing ${PACKAGES[*]}"
    apt-get update -q >"$APT_LOG" 2>&1 || fail "apt-get update failed (see $APT_LOG)"
    # a policy-rc.d that denies keeps the packages' own service scripts from starting daemons that
    # stop.sh would not know of
    POLICY=/usr/sbin/policy-rc.d
    if [[ ! -e $POLICY ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY"
        chmod +x "$POLICY"
        trap 'rm -f "$POLICY"' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" \
        >>"$APT_LOG" 2>&1 || fail "apt-get install ${PACKAGES[*]} failed (see $APT_LOG)"
fi

[[ -e $STATE/pids ]] && fail "$STATE/pids exists: a cluster may be running there (stop.sh $STATE first)"
mkdir -p "$STATE"/{etc,log,run,munge,mysql,spool/ctld,spool/d}
chmod 711 "$STATE/munge"

NODE=moe-node
CPUS=$(nproc)
# what Slurm may hand out: most of the machine's memory, leaving room for the daemons themselves
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
PORT_BASE=${MOE_SLURM_PORT_BASE:-16817}
CTLD_PORT=$PORT_BASE SLURMD_PORT=$((PORT_BASE + 1)) DBD_PORT=$((PORT_BASE + 2)) DB_PORT=$((PORT_BASE + 3))
for port in $CTLD_PORT $SLURMD_PORT $DBD_PORT $DB_PORT; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        fail "port $port is in use (set MOE_SLURM_PORT_BASE)"
    fi
done

start() { # name, command...: run in its own session, remember its PID
    local name=$1
    shift
    setsid "$@" >"$STATE/log/$name.out" 2>&1 </dev/null &
    echo "$name $!" >>"$STATE/pids"
}

wait_for() { # what, seconds, command...
    local what=$1 seconds=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    while ((SECONDS < deadline)); do
        timeout 5 "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    fail "$what did not come up in ${seconds}s (logs in $STATE/log)"
}

# munge: its own key and socket, so the test never touches /etc/munge
dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1 count=1024 status=none
chmod 400 "$STATE/munge/munge.key"
SOCKET=$STATE/munge/munge.socket
start munged munged --foreground --force --key-file="$STATE/munge/munge.key" --socket="$SOCKET" \
    --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"
wait_for munged 10 munge --socket="$SOCKET" --string=ping

# MariaDB for slurmdbd, listening on 127.0.0.1 only
mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql" --skip-test-db \
    --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 ||
    fail "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
DB_SOCKET=$STATE/run/mysqld.sock
start mariadbd mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$DB_SOCKET" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$STATE/run/mariadbd.pid" \
    --log-error="$STATE/log/mariadbd.log" --innodb-buffer-pool-size=64M --skip-log-bin
wait_for mariadbd 30 mariadb --no-defaults --socket="$DB_SOCKET" -e "select 1"
DB_PASS=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
mariadb --no-defaults --socket="$DB_SOCKET" -e "
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

cat >"$STATE/etc/slurm.conf" <<EOF
ClusterName=moe
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCKET
CredType=cred/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# long enough for squeue to see finished and cancelled jobs (the plugin needs >= 3x its first status delay)
MinJobAge=600
KillWait=5
InactiveLimit=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# the munge socket for talking to slurmdbd (AuthInfo covers only slurmctld and slurmd)
AccountingStoragePass=$SOCKET
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
# a fake GPU: Slurm only schedules it, nothing uses /dev/null as a device
echo "NodeName=$NODE Name=gpu File=/dev/null" >"$STATE/etc/gres.conf"
cat >"$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
EOF
chmod 600 "$STATE/etc/slurmdbd.conf"

# Clients find the cluster at the default path: the plugin's job step drops SLURM_CONF before it calls
# srun inside a job. The daemons read $STATE/etc (gres.conf, slurmdbd.conf) through SLURM_CONF.
DEFAULT_CONF=/etc/slurm/slurm.conf
if [[ -e $DEFAULT_CONF || -L $DEFAULT_CONF ]]; then
    [[ $(readlink "$DEFAULT_CONF") == */etc/slurm.conf && ! -e $(readlink "$DEFAULT_CONF") ]] ||
        fail "$DEFAULT_CONF exists: this machine has a Slurm configuration of its own"
    rm "$DEFAULT_CONF" # left by a test cluster that is gone
fi
mkdir -p /etc/slurm
ln -s "$STATE/etc/slurm.conf" "$DEFAULT_CONF"
echo "$DEFAULT_CONF" >"$STATE/default-conf-link"
export SLURM_CONF=$STATE/etc/slurm.conf

start slurmdbd slurmdbd -D
wait_for slurmdbd 30 sacctmgr -n list cluster
# the account the README tells users to set (slurm_account); the cluster registers itself with slurmctld
sacctmgr -i add cluster moe >/dev/null
sacctmgr -i add account moe Description=moe-offload Organization=ci >/dev/null
sacctmgr -i add user root Account=moe DefaultAccount=moe >/dev/null

start slurmctld slurmctld -D
wait_for slurmctld 30 scontrol ping
start slurmd slurmd -D -N "$NODE"
wait_for "node $NODE" 30 bash -c "sinfo -h -N -n $NODE -o %T | grep -qx idle"
echo "slurm cluster up: node $NODE, $CPUS CPUs, $MEM_MB MB, 1 fake GPU"
