#!/usr/bin/env bash
# Slurm end-to-end test: the example users copy, docs/examples/jupyter.sbatch, run for
# real as an ordinary user on the one-node Slurm of slurm-setup.sh (run that first).
#
#   sbatch (as $E2E_USER) -> the job runs `jobgate agent --jupyter` -> the URL appears in
#   the job's output file -> HTTP checks reach JupyterLab through the relay -> scancel ->
#   within 10 s the URL answers 404 and no jobgate or jupyter process of the job remains.
#
# The example reads the relay, its CA and the token file from JOBGATE_RELAY,
# JOBGATE_RELAY_CA and JOBGATE_TOKEN_FILE, passed here with `sbatch --export`.
# Prints PASS or FAIL with timings; exit status 0 only on PASS.

# shellcheck source=tests/e2e/common.sh
source "$(dirname "$0")/common.sh"

EXAMPLE=$REPO_ROOT/docs/examples/jupyter.sbatch
JOB_ID=
cleanup() {
	local code=$?
	if [ -n "$JOB_ID" ]; then
		scancel "$JOB_ID" 2>/dev/null || true
	fi
	if [ $code -ne 0 ] && [ -n "${WORK:-}" ]; then
		for f in "$UWORK"/job/slurm-*.out "$WORK/relay.log"; do
			[ -f "$f" ] && { echo "--- $f (last 40 lines)" >&2; tail -n 40 "$f" >&2; }
		done
	fi
	cleanup_common
	if [ $code -eq 0 ]; then
		echo "slurm-jupyter: PASS in $(since "$T0") s"
	else
		echo "slurm-jupyter: FAIL (exit $code) after $(since "$T0") s"
	fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "run as root (it runs the job as $E2E_USER)"
scontrol ping 2>/dev/null | grep -q 'is UP' || die "Slurm is not running: run tests/e2e/slurm-setup.sh first"
[ -f "$EXAMPLE" ] || die "no $EXAMPLE"
ensure_base_tools
ensure_venv
ensure_user

make_workdir
start_relay
install -d -m 700 -o "$E2E_USER" -g "$E2E_USER" "$UWORK/job"
install -m 644 "$EXAMPLE" "$WORK/jupyter.sbatch"

t=$(now_ms)
JOB_ID=$(cd "$UWORK/job" && as_user sbatch --parsable --chdir="$UWORK/job" \
	--output="$UWORK/job/slurm-%j.out" --cpus-per-task=1 \
	--export="ALL,JOBGATE_RELAY=127.0.0.1:$QUIC_PORT,JOBGATE_RELAY_CA=$CA,JOBGATE_TOKEN_FILE=$UWORK/token" \
	"$WORK/jupyter.sbatch") || die "sbatch failed"
JOB_ID=${JOB_ID%%;*}
OUT=$UWORK/job/slurm-$JOB_ID.out
log "submitted job $JOB_ID"

URL=
for _ in $(seq 1200); do
	URL=$(sed -n 's/^jobgate: your app is at //p' "$OUT" 2>/dev/null | head -n1 || true)
	[ -n "$URL" ] && break
	state=$(squeue -h -j "$JOB_ID" -o %T 2>/dev/null || true)
	[ -n "$state" ] || die "job $JOB_ID ended before printing a URL"
	sleep 0.1
done
[ -n "$URL" ] || die "no URL in $OUT within 120 s"
log "URL in the job output $(since "$t") s after sbatch: $URL"
mode=$(stat -c %a "$OUT")
[ "$mode" = 600 ] || die "the job output holds the private link but has mode $mode"

# The printed link logs straight in: open it as a browser would (a navigation: the relay
# trades its access key for a cookie and redirects, Jupyter trades its token for a cookie).
JAR=$WORK/cookies
page=$(relay_curl -L -b "$JAR" -c "$JAR" -H 'Sec-Fetch-Mode: navigate' -H 'Accept: text/html' \
	-w '\n%{http_code}' "$URL") || die "GET $URL failed"
code=${page##*$'\n'}
[ "$code" = 200 ] || die "the printed URL answered $code"
grep -q '<title>JupyterLab</title>' <<<"$page" || die "the printed URL is not JupyterLab"
ROOT=$(session_root "$URL")
status=$(relay_curl -b "$JAR" -c "$JAR" "${ROOT}api/status") || die "GET /api/status failed"
grep -q '"started"' <<<"$status" || die "/api/status through the relay: $status"
# Jupyter's XSRF check stays on: a POST without the XSRF token is refused, with it accepted.
xsrf=$(awk '$6 == "_xsrf" { print $7 }' "$JAR" | tail -n1)
[ -n "$xsrf" ] || die "Jupyter set no _xsrf cookie"
code=$(relay_curl -b "$JAR" -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
	-d '{"type":"notebook"}' "${ROOT}api/contents")
[ "$code" = 403 ] || die "POST without XSRF token answered $code, want 403"
created=$(relay_curl -b "$JAR" -w '\n%{http_code}' -X POST -H 'Content-Type: application/json' \
	-H "X-XSRFToken: $xsrf" -H "Origin: ${ROOT%/}" -d '{"type":"notebook"}' "${ROOT}api/contents")
[ "${created##*$'\n'}" = 201 ] || die "POST /api/contents with XSRF token: $created"
log "JupyterLab answers through the relay (page, API, XSRF-checked POST)"

node=$(squeue -h -j "$JOB_ID" -o %N)
pids=$(scontrol listpids "$JOB_ID" "$node" 2>/dev/null | awk 'NR > 1 && $1 ~ /^[0-9]+$/ { print $1 }' | tr '\n' ' ')
procs=$(for p in $pids; do tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-60; echo; done | grep -cE 'jobgate|jupyter' || true)
[ "$procs" -ge 2 ] || die "expected jobgate and jupyter among the job's processes (pids: $pids)"
log "the job runs $(wc -w <<<"$pids") processes ($procs jobgate/jupyter)"

t=$(now_ms)
scancel "$JOB_ID"
gone=
for _ in $(seq 100); do
	if [ "$(status_of "$ROOT")" = 404 ]; then
		gone=$(since "$t")
		break
	fi
	sleep 0.1
done
[ -n "$gone" ] || die "the URL did not answer 404 within 10 s of scancel"
log "URL answers 404 $gone s after scancel"
left=
for _ in $(seq 100); do
	left=
	for p in $pids; do
		if [ -d "/proc/$p" ]; then left="$left $p"; fi
	done
	left="$left $(pgrep -u "$E2E_USER" -f 'jobgate|jupyter' | tr '\n' ' ' || true)"
	[ -z "${left// /}" ] && break
	sleep 0.1
done
[ -z "${left// /}" ] || die "processes of the job remain 10 s after scancel:$(ps -o pid=,args= -p "${left// /,}" 2>/dev/null)"
log "no jobgate or jupyter process of the job remains $(since "$t") s after scancel"
JOB_ID_DONE=$JOB_ID
JOB_ID=
state=$(scontrol show job "$JOB_ID_DONE" 2>/dev/null | grep -o 'JobState=[A-Z]*' || true)
log "job $JOB_ID_DONE: $state"
