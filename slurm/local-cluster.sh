#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (Debian slurm-wlm + munge, as root, no systemd needed),
# for trying the sbatch templates and for tests/slurm. Recipe: ../shared/docs/platform.md §10.
#
#   bash slurm/local-cluster.sh start    # install if needed, write slurm.conf, start munged/slurmctld/slurmd
#   bash slurm/local-cluster.sh status   # exit 0 if the node answers (sinfo)
#   bash slurm/local-cluster.sh stop     # stop the daemons this script started (by pid file)
#
# Idempotent: `start` does nothing when its daemons already run with the same slurm.conf, and
# restarts only its own daemons otherwise. `stop` ends slurmctld/slurmd through their pid files and
# munged only if this script started it: nothing is killed by name.
#
# Two modes:
# - default: the system cluster (/etc/slurm/slurm.conf, /run/slurm*.pid, /var/spool/slurm*);
# - HPCFL_SLURM_DIR=DIR: a private cluster whose conf, state, logs and pid files all live in DIR,
#   on ports HPCFL_SLURM_PORT and HPCFL_SLURM_PORT+1 (default 6917/6918), so it can run beside a
#   system cluster. Client commands then need SLURM_CONF=DIR/slurm.conf (`... env` prints it).
# Installing the packages (when slurmctld or munged is missing) needs root and apt; every apt-get
# and every wait is bounded by a timeout (HPCFL_APT_TIMEOUT, default 600 s). Exit codes: 0 ok,
# 1 the daemons did not come up, 2 cannot install (not root, no apt, apt failed).
set -euo pipefail
action=${1:-start}
host=$(hostname -s 2>/dev/null || hostname)
apt_timeout=${HPCFL_APT_TIMEOUT:-600}

if [ -n "${HPCFL_SLURM_DIR:-}" ]; then
  mkdir -p "$HPCFL_SLURM_DIR"
  dir=$(cd "$HPCFL_SLURM_DIR" && pwd)
  conf=$dir/slurm.conf
  port=${HPCFL_SLURM_PORT:-6917}
  cluster=hpcfl-private
  ctld_pid=$dir/slurmctld.pid; slurmd_pid=$dir/slurmd.pid
  ctld_spool=$dir/spool-ctld; slurmd_spool=$dir/spool-slurmd; logs=$dir/log
  marker=$dir/munged.started-by-hpcfl
  first_job=100000
else
  dir=""
  conf=/etc/slurm/slurm.conf
  port=${HPCFL_SLURM_PORT:-6817}
  cluster=localcluster
  ctld_pid=/run/slurmctld.pid; slurmd_pid=/run/slurmd.pid
  ctld_spool=/var/spool/slurmctld; slurmd_spool=/var/spool/slurmd; logs=/var/log/slurm
  marker=/run/munge.started-by-hpcfl
  first_job=1
fi
export SLURM_CONF=$conf

say() { echo "local-cluster: $*" >&2; }

alive() {  # alive PIDFILE: the process named in PIDFILE runs
  [ -s "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null
}

stop_pidfile() {  # stop_pidfile PIDFILE NAME: TERM, wait up to 10 s, then KILL
  local f=$1 name=$2 pid
  alive "$f" || { rm -f "$f"; return 0; }
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then say "$name ($pid) ignored TERM; sending KILL"; kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$f"
}

node_up() {  # our controller answers (not another cluster's on the same port) and the node is usable
  local config states  # (no `cmd | grep -q` under pipefail: grep's early exit fails the pipe)
  config=$(timeout 10 scontrol show config 2>/dev/null) || return 1
  grep -qE "^ClusterName += $cluster\$" <<<"$config" || return 1
  states=$(timeout 10 sinfo -h -o %t 2>/dev/null) || return 1
  grep -qE '^(idle|mix|alloc|comp)' <<<"$states"
}

stop() {
  stop_pidfile "$slurmd_pid" slurmd
  stop_pidfile "$ctld_pid" slurmctld
  if [ -s "$marker" ] && [ -s /run/munge/munged.pid ] && [ "$(cat "$marker")" = "$(cat /run/munge/munged.pid)" ]; then
    stop_pidfile /run/munge/munged.pid munged
  fi
  rm -f "$marker"
}

case "$action" in
  stop) stop; exit 0 ;;
  status) if node_up; then timeout 10 sinfo; exit 0; else say "no Slurm node answers (SLURM_CONF=$conf)"; exit 1; fi ;;
  env) echo "export SLURM_CONF=$conf"; exit 0 ;;
  start) ;;
  *) echo "usage: $0 start|status|stop|env" >&2; exit 64 ;;
esac

# ---------------------------------------------------------------- install
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  [ "$(id -u)" = 0 ] || { say "slurm-wlm/munge are not installed and installing needs root"; exit 2; }
  command -v apt-get >/dev/null || { say "slurm-wlm/munge are not installed and there is no apt-get"; exit 2; }
  pkgs=(slurm-wlm slurm-client munge)
  export DEBIAN_FRONTEND=noninteractive
  say "installing ${pkgs[*]}"
  if ! timeout "$apt_timeout" apt-get install -y -q --no-install-recommends "${pkgs[@]}"; then
    say "apt-get install failed; updating the package lists and retrying"
    timeout "$apt_timeout" apt-get update -q || { say "apt-get update failed"; exit 2; }
    timeout "$apt_timeout" apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
      || { say "apt-get install ${pkgs[*]} failed"; exit 2; }
  fi
fi
[ "$(id -u)" = 0 ] || { say "starting the daemons needs root (SlurmUser=root)"; exit 2; }

# ---------------------------------------------------------------- munge
if ! timeout 5 bash -c 'munge -n | unmunge' >/dev/null 2>&1; then
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1k count=1 status=none
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  if ! alive /run/munge/munged.pid; then
    rm -f /run/munge/munged.pid
    timeout 20 runuser -u munge -- /usr/sbin/munged || { say "munged did not start"; exit 1; }
    cat /run/munge/munged.pid > "$marker" 2>/dev/null || true
  fi
  for _ in $(seq 1 50); do timeout 5 bash -c 'munge -n | unmunge' >/dev/null 2>&1 && break; sleep 0.2; done
  timeout 5 bash -c 'munge -n | unmunge' >/dev/null 2>&1 || { say "munge does not answer"; exit 1; }
fi

# ---------------------------------------------------------------- slurm.conf
# CPUs=8 with config_overrides lets 4-8 MPI ranks share a 2-core VM without --overcommit.
# NodeAddr/SlurmctldHost 127.0.0.1: works even where the host name does not resolve.
new_conf=$(cat <<CONF
ClusterName=$cluster
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
FirstJobId=$first_job
MinJobAge=600
SlurmctldPidFile=$ctld_pid
SlurmdPidFile=$slurmd_pid
SlurmdSpoolDir=$slurmd_spool
StateSaveLocation=$ctld_spool
SlurmctldLogFile=$logs/slurmctld.log
SlurmdLogFile=$logs/slurmd.log
SchedulerType=sched/backfill
NodeName=$host NodeAddr=127.0.0.1 CPUs=8 Boards=1 SocketsPerBoard=1 CoresPerSocket=8 ThreadsPerCore=1 RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
)
if alive "$ctld_pid" && alive "$slurmd_pid" && [ -f "$conf" ] && [ "$(cat "$conf")" = "$new_conf" ] && node_up; then
  say "already running ($conf)"
  timeout 10 sinfo
  exit 0
fi
mkdir -p "$(dirname "$conf")" "$ctld_spool" "$slurmd_spool" "$logs"
printf '%s\n' "$new_conf" > "$conf"
stop_pidfile "$slurmd_pid" slurmd
stop_pidfile "$ctld_pid" slurmctld
timeout 30 slurmctld -f "$conf" || { say "slurmctld did not start; see $logs/slurmctld.log"; tail -n 5 "$logs/slurmctld.log" >&2 || true; exit 1; }
timeout 30 slurmd -f "$conf" || { say "slurmd did not start; see $logs/slurmd.log"; tail -n 5 "$logs/slurmd.log" >&2 || true; exit 1; }
for _ in $(seq 1 100); do
  if ! alive "$ctld_pid" || ! alive "$slurmd_pid"; then sleep 0.5; alive "$ctld_pid" && alive "$slurmd_pid" || break; fi
  if node_up; then
    # Warm-up step: on a freshly started slurmd the first job step's MPI_Init never returns under
    # --mpi=pmi2 (pip MPICH 5.0.2, Slurm 22.05; reproduced 3 of 3 on 2026-12-04, every later step
    # starts at once). One non-MPI step first makes the next MPI step start normally.
    timeout 60 srun -n 1 -t 1 true || say "warm-up step (srun true) failed; the first MPI step may hang"
    timeout 10 sinfo; exit 0
  fi
  sleep 0.2
done
say "the node did not come up (a daemon exited, or 20 s passed); see $logs/"
tail -n 5 "$logs/slurmctld.log" "$logs/slurmd.log" >&2 || true
exit 1
