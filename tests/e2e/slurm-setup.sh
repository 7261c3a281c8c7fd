#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the end-to-end tests (no systemd needed).
#
#   tests/e2e/slurm-setup.sh [start]   install (Debian slurm-wlm + munge), configure, start,
#                                      and wait until a probe job (`srun true`) runs
#   tests/e2e/slurm-setup.sh stop      stop slurmctld, slurmd and munged
#
# munged runs as user munge, slurmctld as SlurmUser=slurm, slurmd as root. The node's
# address is pinned to 127.0.0.1; proctrack/cgroup makes `scancel` kill every process of
# a job, double-forked ones included. Needs root. Refuses to overwrite a slurm.conf it
# did not write (set E2E_SLURM_FORCE=1 to take it over).

# shellcheck source=tests/e2e/common.sh
source "$(dirname "$0")/common.sh"

MARK='# written by jobgate tests/e2e/slurm-setup.sh'
CONF=/etc/slurm/slurm.conf
CGROUP_CONF=/etc/slurm/cgroup.conf

slurm_up() {
	scontrol ping 2>/dev/null | grep -q 'is UP' &&
		timeout 30 srun --quiet -N1 -t 1 true 2>/dev/null
}

write_config() {
	local host hw mem
	host=$(hostname -s)
	# CPUs/sockets/cores as slurmd sees them; RealMemory below MemTotal.
	hw=$(slurmd -C | head -n1 | grep -o 'CPUs=[0-9]* Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*')
	[ -n "$hw" ] || die "cannot read the node's hardware from slurmd -C"
	mem=$(awk '/MemTotal/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
	if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ "${E2E_SLURM_FORCE:-0}" != 1 ]; then
		die "$CONF exists and was not written by this script (E2E_SLURM_FORCE=1 takes it over)"
	fi
	mkdir -p /etc/slurm
	cat >"$CONF.new" <<EOF
$MARK
ClusterName=jobgate-e2e
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
ProctrackType=proctrack/cgroup
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
KillWait=5
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 $hw RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
	cat >"$CGROUP_CONF.new" <<EOF
$MARK
CgroupPlugin=cgroup/v1
CgroupAutomount=yes
EOF
	CONFIG_CHANGED=0
	cmp -s "$CONF.new" "$CONF" || CONFIG_CHANGED=1
	cmp -s "$CGROUP_CONF.new" "$CGROUP_CONF" || CONFIG_CHANGED=1
	mv "$CONF.new" "$CONF"
	mv "$CGROUP_CONF.new" "$CGROUP_CONF"
	chmod 644 "$CONF" "$CGROUP_CONF"
}

start_munge() {
	install -d -o munge -g munge -m 700 /etc/munge /var/lib/munge /var/log/munge
	install -d -o munge -g munge -m 755 /run/munge
	if [ ! -s /etc/munge/munge.key ]; then
		dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
	fi
	chown munge:munge /etc/munge/munge.key
	chmod 400 /etc/munge/munge.key
	if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
		return 0
	fi
	setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged
	for _ in $(seq 50); do
		munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	die "munged did not come up"
}

stop_daemons() {
	local name pid
	for name in slurmctld slurmd; do
		for pid in $(pgrep -x "$name" || true); do stop_pid "$pid"; done
	done
}

start() {
	local t
	t=$(now_ms)
	apt_install slurm-wlm munge
	write_config
	if [ "$CONFIG_CHANGED" = 0 ] && slurm_up; then
		log "slurm already up (probe job ran) after $(since "$t") s"
		return 0
	fi
	start_munge
	stop_daemons
	install -d -o slurm -g slurm -m 755 /var/spool/slurmctld /var/log/slurm /run/slurm
	install -d -m 755 /var/spool/slurmd
	slurmctld
	slurmd
	for _ in $(seq 300); do
		if slurm_up; then
			log "slurm up (probe job ran) after $(since "$t") s"
			return 0
		fi
		# A node left DOWN by an earlier run comes back here.
		scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
		sleep 0.2
	done
	tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
	die "slurm did not run a probe job within 60 s"
}

stop() {
	scontrol shutdown >/dev/null 2>&1 || true
	stop_daemons
	local pid
	pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
	[ -n "$pid" ] && stop_pid "$pid"
	log "slurm stopped"
}

[ "$(id -u)" = 0 ] || die "run as root"
case ${1:-start} in
start) start ;;
stop) stop ;;
*) die "usage: $0 [start|stop]" ;;
esac
