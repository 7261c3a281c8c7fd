#!/usr/bin/env bash
# Open OnDemand app end-to-end test: contrib/ood/jobgate-jupyter rendered as OnDemand
# renders it, run as a batch job on the one-node Slurm of slurm-setup.sh (run that first).
#
#   render (as $E2E_USER, Ruby's ERB with OnDemand's bindings: tests/e2e/ood_render.rb)
#   -> sbatch the job script -> after.sh waits for the agent's URL -> connection.yml (0600)
#   holds jobgate_url -> view.html.erb renders a Connect link to it -> that link serves
#   JupyterLab through the relay (page and API) -> scancel -> the URL answers 404.
# Also: after.sh refuses a job file whose URL is not a plain https URL, and the view
# renders no link for one.
#
# Needs root (apt ruby, the job runs as $E2E_USER). Prints PASS or FAIL; exit 0 only on PASS.

# shellcheck source=tests/e2e/common.sh
source "$(dirname "$0")/common.sh"

APP=$REPO_ROOT/contrib/ood/jobgate-jupyter
RENDER=$E2E_DIR/ood_render.rb
JOB_ID=
cleanup() {
	local code=$?
	if [ -n "$JOB_ID" ]; then
		scancel "$JOB_ID" 2>/dev/null || true
	fi
	if [ $code -ne 0 ] && [ -n "${WORK:-}" ]; then
		for f in "${STAGED:-/nonexistent}"/output.log "$WORK/relay.log"; do
			[ -f "$f" ] && { echo "--- $f (last 40 lines)" >&2; tail -n 40 "$f" >&2; }
		done
	fi
	cleanup_common
	if [ $code -eq 0 ]; then
		echo "ood-app: PASS in $(since "$T0") s"
	else
		echo "ood-app: FAIL (exit $code) after $(since "$T0") s"
	fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "run as root (it installs ruby and runs the job as $E2E_USER)"
scontrol ping 2>/dev/null | grep -q 'is UP' || die "Slurm is not running: run tests/e2e/slurm-setup.sh first"
ensure_base_tools
apt_install ruby
ensure_venv
ensure_user

make_workdir
start_relay
install -m 644 "$RENDER" "$WORK/ood_render.rb"
cp -r "$APP" "$WORK/app" && chmod -R a+rX "$WORK/app"
STAGED=$UWORK/ondemand/data/sys/dashboard/batch_connect/sys/jobgate-jupyter/output/session1
install -d -m 700 -o "$E2E_USER" -g "$E2E_USER" "$UWORK/ondemand"

# --- the view refuses anything but a plain https URL (no job needed) -----------------
for bad in 'javascript:alert(1)' 'https://x.test/"><script>alert(1)</script>' 'http://x.test/' ''; do
	printf 'jobgate_url: %s\n' "'${bad//\'/\'\'}'" >"$WORK/bad.yml"
	html=$(ruby "$RENDER" view "$WORK/app" "$WORK/bad.yml") || die "the view failed to render for '$bad'"
	grep -q 'href=' <<<"$html" && die "the view links a bad URL '$bad': $html"
	grep -q 'no valid link' <<<"$html" || die "the view says nothing for a bad URL '$bad'"
done
printf '%s\n' "jobgate_url: 'https://a-b.x.test:8443/lab?token=T&jobgate_key=K'" >"$WORK/good.yml"
html=$(ruby "$RENDER" view "$WORK/app" "$WORK/good.yml")
grep -qF 'href="https://a-b.x.test:8443/lab?token=T&amp;jobgate_key=K"' <<<"$html" ||
	die "the view does not link (HTML-escaped) a good URL: $html"
log "view.html.erb links a valid URL, HTML-escaped, and refuses 4 bad ones"

# --- after.sh refuses a job file with a bad URL (clean_up 1) --------------------------
as_user ruby "$WORK/ood_render.rb" stage "$WORK/app" "$UWORK/ondemand/probe" \
	'{"num_cores":"1","jobgate_relay":"r.test:1","jupyter_setup":""}' || die "rendering failed"
printf '{\n  "job_id": "1",\n  "state": "connected",\n  "url": "https://x.test/a b\\"<"\n}\n' >"$WORK/bad.json"
out=$(JOBGATE_URL_WAIT=2 bash -c 'clean_up() { echo "clean_up $1"; exit 3; }
	SCRIPT_PID=$$ jobgate_job_file=$1; source "$2"' _ "$WORK/bad.json" "$UWORK/ondemand/probe/after.sh" 2>&1) && rc=0 || rc=$?
[ "$rc" = 3 ] && grep -q 'clean_up 1' <<<"$out" || die "after.sh accepted a bad URL (exit $rc): $out"
grep -q 'no valid jobgate URL' <<<"$out" || die "after.sh did not say why: $out"
log "after.sh refuses a job file whose URL is not a plain https URL"

# --- the real run: render as the user, submit, connect --------------------------------
form=$(printf '{"bc_num_hours":"1","num_cores":"1","jobgate_relay":"127.0.0.1:%s","jupyter_setup":"export PATH=%s:$PATH"}' \
	"$QUIC_PORT" "$WORK/bin:$VENV/bin")
as_user ruby "$WORK/ood_render.rb" stage "$WORK/app" "$STAGED" "$form" || die "rendering the app failed"
grep -q "JOBGATE_RELAY=\${JOBGATE_RELAY:-127.0.0.1:$QUIC_PORT}" "$STAGED/before.sh" || die "before.sh lacks the relay"
# The app calls no OnDemand helper but clean_up (so a harness or ood_core version drift
# in the others cannot break it).
if grep -nE '\b(find_port|port_used|wait_until_port_used|create_passwd|random_number)\b' "$STAGED"/{before,after,script}.sh; then
	die "the app calls OnDemand helpers beyond clean_up"
fi
mapfile -t native <"$STAGED/native_args"
t=$(now_ms)
JOB_ID=$(as_user JOBGATE_RELAY_CA="$CA" JOBGATE_TOKEN_FILE="$UWORK/token" \
	sbatch --parsable --chdir="$STAGED" --output="$STAGED/output.log" --time=60 --export=ALL \
	"${native[@]}" "$STAGED/job_script.sh") || die "sbatch failed"
JOB_ID=${JOB_ID%%;*}
log "submitted job $JOB_ID (native args: ${native[*]})"

# OnDemand's "running" = job RUNNING and connection.yml present.
for _ in $(seq 1800); do
	[ -f "$STAGED/connection.yml" ] && break
	state=$(squeue -h -j "$JOB_ID" -o %T 2>/dev/null || true)
	[ -n "$state" ] || die "job $JOB_ID ended before writing connection.yml"
	sleep 0.1
done
[ -f "$STAGED/connection.yml" ] || die "no connection.yml within 180 s"
[ "$(squeue -h -j "$JOB_ID" -o %T)" = RUNNING ] || die "connection.yml but the job is not RUNNING"
log "connection.yml $(since "$t") s after sbatch"
mode=$(stat -c %a "$STAGED/connection.yml")
[ "$mode" = 600 ] || die "connection.yml holds the private link but has mode $mode"

html=$(as_user ruby "$WORK/ood_render.rb" view "$WORK/app" "$STAGED/connection.yml") || die "the view failed"
href=$(sed -n 's/.*href="\([^"]*\)".*/\1/p' <<<"$html" | head -n1)
[ -n "$href" ] || die "the view has no Connect link: $html"
URL=$(sed 's/&amp;/\&/g' <<<"$href")
case $URL in https://*."$E2E_DOMAIN":"$HTTPS_PORT"/*) ;; *) die "the Connect link is no jobgate URL: $URL" ;; esac
log "Connect opens $URL"

JAR=$WORK/cookies
page=$(relay_curl -L -b "$JAR" -c "$JAR" -H 'Sec-Fetch-Mode: navigate' -H 'Accept: text/html' \
	-w '\n%{http_code}' "$URL") || die "GET $URL failed"
[ "${page##*$'\n'}" = 200 ] || die "the Connect link answered ${page##*$'\n'}"
grep -q '<title>JupyterLab</title>' <<<"$page" || die "the Connect link is not JupyterLab"
ROOT=$(session_root "$URL")
status=$(relay_curl -b "$JAR" -c "$JAR" "${ROOT}api/status") || die "GET /api/status failed"
grep -q '"started"' <<<"$status" || die "/api/status through the relay: $status"
log "the Connect link serves JupyterLab (page and API)"

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
[ -n "$gone" ] || die "the URL did not answer 404 within 10 s of scancel (it answers $(status_of "$ROOT"))"
log "URL answers 404 $gone s after scancel"
# before.sh passed Slurm's SIGTERM on: the agent ended cleanly and said so in its job file.
JOB_FILE=$(getent passwd "$E2E_USER" | cut -d: -f6)/.jobgate/jobs/$JOB_ID.json
for _ in $(seq 100); do
	grep -q '"state": "ended"' "$JOB_FILE" 2>/dev/null && break
	sleep 0.1
done
grep -q '"state": "ended"' "$JOB_FILE" || die "the agent did not end cleanly on scancel: $(cat "$JOB_FILE")"
log "the agent ended cleanly (job file state ended)"
JOB_ID=
