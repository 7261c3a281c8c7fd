#!/usr/bin/env bash
# Browser end-to-end test: real JupyterLab behind a real relay, used from real Chromium.
#
#   relay (root, loopback)  <--QUIC--  jobgate agent --jupyter (as $E2E_USER)  -->  jupyter lab on a unix socket
#   headless Chromium --HTTPS--> relay: open the printed URL, notebook print(6*7) -> 42,
#   terminal `touch`, 50 MB upload + download with the same SHA-256, screenshot;
#   then SIGTERM the agent: the URL answers 404 and no process of the job remains.
#
# Needs root (installs, useradd, setpriv). Installs what it needs on first run (apt:
# chromium, python3-venv; PyPI: jupyterlab>=4 in a venv; npm: playwright-core).
# Usage: tests/e2e/jupyter-browser.sh   (JOBGATE_BIN=path/to/jobgate to test another build)
# Prints PASS or FAIL with timings; exit status 0 only on PASS.

# shellcheck source=tests/e2e/common.sh
source "$(dirname "$0")/common.sh"

AGENT_PID=
cleanup() {
	local code=$?
	if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
		stop_pid "$AGENT_PID"
	fi
	if [ $code -ne 0 ] && [ -n "${WORK:-}" ]; then
		for f in "$WORK/agent.log" "$WORK/relay.log"; do
			[ -f "$f" ] && { echo "--- $f (last 40 lines)" >&2; tail -n 40 "$f" >&2; }
		done
	fi
	cleanup_common
	if [ $code -eq 0 ]; then
		echo "jupyter-browser: PASS in $(since "$T0") s"
	else
		echo "jupyter-browser: FAIL (exit $code) after $(since "$T0") s"
	fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and runs the job as $E2E_USER)"

t=$(now_ms)
ensure_base_tools
apt_install chromium
ensure_venv
ensure_node_modules
ensure_user
log "setup done in $(since "$t") s"

make_workdir
rm -f "$ARTIFACTS/jupyter-notebook.png" "$ARTIFACTS/jupyter-notebook-failure.png"
start_relay

# The job side, as the unprivileged user, with a fresh HOME (no saved Lab workspace).
install -d -m 700 -o "$E2E_USER" -g "$E2E_USER" "$UWORK/home" "$UWORK/notebooks"
t=$(now_ms)
# It starts in its notebook directory, as a batch job starts in its submit directory
# (Jupyter serves, and its terminals start in, the working directory).
(cd "$UWORK/notebooks" && exec setpriv --reuid="$E2E_USER" --regid="$E2E_USER" --init-groups \
	env -i HOME="$UWORK/home" USER="$E2E_USER" LOGNAME="$E2E_USER" PATH="$JOB_PATH" LANG=C.UTF-8 \
	SHELL=/bin/bash \
	jobgate agent --relay "127.0.0.1:$QUIC_PORT" --relay-ca "$CA" --token-file "$UWORK/token" \
	--url-file "$UWORK/url" --jupyter) >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
URL=$(wait_for_file_line "$UWORK/url" 120) || die "no URL in $UWORK/url within 120 s"
log "agent up in $(since "$t") s: $URL"
grep -q 'jobgate: your app is at' "$WORK/agent.log" || die "the agent did not print the URL line"
case $URL in
*lab\?token=* | *lab\?*\&token=*) ;;
*) die "the URL does not open Lab with Jupyter's token: $URL" ;;
esac

# Nothing of the job listens on TCP (the agent dials out; Jupyter is on a unix socket).
JOB_PIDS=$(pgrep -u "$E2E_USER" | tr '\n' ' ')
if command -v ss >/dev/null; then
	for pid in $JOB_PIDS; do
		if ss -Hltnp 2>/dev/null | grep -q "pid=$pid,"; then
			die "process $pid of the job listens on TCP: $(ss -Hltnp | grep "pid=$pid,")"
		fi
	done
fi
# Jupyter's token is nowhere on a command line.
TOKEN=${URL##*token=}
TOKEN=${TOKEN%%&*}
for pid in $JOB_PIDS; do
	if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$TOKEN"; then
		die "Jupyter's token is on the command line of process $pid"
	fi
done

SPKI=$(openssl x509 -in "$WORK/pki/cert.pem" -pubkey -noout |
	openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64)
t=$(now_ms)
JG_URL=$URL JG_DOMAIN=$E2E_DOMAIN JG_SPKI=$SPKI JG_NODE_PREFIX=$NODE_PREFIX \
	JG_SCREENSHOT="$ARTIFACTS/jupyter-notebook.png" JG_UPLOAD_MB=${JG_UPLOAD_MB:-50} \
	node "$E2E_DIR/jupyter-browser.mjs" || die "the browser steps failed (screenshot in $ARTIFACTS)"
log "browser steps done in $(since "$t") s; screenshot $ARTIFACTS/jupyter-notebook.png"

# End the job's agent: the URL must answer 404 at once, the job's processes must go.
ROOT=$(session_root "$URL")
t=$(now_ms)
kill -TERM "$AGENT_PID"
code=
for _ in $(seq 50); do
	code=$(status_of "$ROOT")
	[ "$code" = 404 ] && break
	sleep 0.1
done
[ "$code" = 404 ] || die "after SIGTERM the URL answers $code, not 404"
log "URL answers 404 $(since "$t") s after SIGTERM"
status=0
wait "$AGENT_PID" || status=$?
AGENT_PID=
log "agent exited with status $status $(since "$t") s after SIGTERM"
# SIGTERM to the agent = SIGTERM to Jupyter, which exits 0 after stopping its kernels.
[ "$status" = 0 ] || [ "$status" = 143 ] || die "agent exit status $status"
for _ in $(seq 100); do
	left=$(pgrep -u "$E2E_USER" -a || true)
	[ -z "$left" ] && break
	sleep 0.1
done
[ -z "$left" ] || die "processes of the job remain 10 s after SIGTERM: $left"
log "no process of the job remains"
[ -z "$(find /tmp -maxdepth 1 -user "$E2E_USER" -name 'jobgate-*' 2>/dev/null)" ] ||
	die "the agent left its private directory behind"
