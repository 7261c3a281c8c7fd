#!/usr/bin/env bash
# Browser end-to-end test: one session must not act inside another.
#
#   relay (root, loopback)  <--QUIC--  two agents (as $E2E_USER; relay users $E2E_USER and
#   mallory), each running tests/e2e/cross-session-app.py on a loopback port.
#   Headless Chromium opens the victim's printed link (so it holds the victim's cookie),
#   then the attacker's page, which POSTs into the victim's session and opens a WebSocket
#   to it. PASS when the WebSocket never opens, the victim's app saw none of the attack's
#   requests (its request log, and the agent's log), and the victim's own page still works.
#
# Needs root (installs, useradd, setpriv); no Slurm, no Jupyter. Installs what it needs on
# first run (apt: chromium, python3; npm: playwright-core).
# Usage: tests/e2e/cross-session-browser.sh   (JOBGATE_BIN=path/to/jobgate to test another build)
# Prints PASS or FAIL with timings; exit status 0 only on PASS.

# shellcheck source=tests/e2e/common.sh
source "$(dirname "$0")/common.sh"

# The attacker is another relay user (a different token), as on a real cluster.
ATTACKER_USER=mallory
VICTIM_PID=
ATTACKER_PID=
cleanup() {
	local code=$?
	stop_pid "$VICTIM_PID"
	stop_pid "$ATTACKER_PID"
	if [ $code -ne 0 ] && [ -n "${WORK:-}" ]; then
		for f in "$WORK/victim.log" "$WORK/attacker.log" "$WORK/relay.log"; do
			[ -f "$f" ] && { echo "--- $f (last 40 lines)" >&2; tail -n 40 "$f" >&2; }
		done
	fi
	cleanup_common
	if [ $code -eq 0 ]; then
		echo "cross-session-browser: PASS in $(since "$T0") s"
	else
		echo "cross-session-browser: FAIL (exit $code) after $(since "$T0") s"
	fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and runs the jobs as $E2E_USER)"

t=$(now_ms)
ensure_base_tools
apt_install chromium python3
ensure_node_modules
ensure_user
log "setup done in $(since "$t") s"

make_workdir
install -m 755 "$E2E_DIR/cross-session-app.py" "$WORK/bin/cross-session-app.py"
# The attacker's token goes into the tokens file before the relay reads it.
"$JOBGATE_BIN" token issue --tokens "$WORK/relay/tokens.toml" --user "$ATTACKER_USER" 2>/dev/null >"$WORK/relay/attacker.tmp"
install -m 600 -o "$E2E_USER" -g "$E2E_USER" "$WORK/relay/attacker.tmp" "$UWORK/attacker-token"
rm -f "$WORK/relay/attacker.tmp"
start_relay

# start_job LABEL TOKEN_FILE: an agent (as the job user) running the test app; sets JOB_PID.
start_job() {
	local label=$1 token=$2
	# `exec` in a subshell, so that $! is the agent itself: a backgrounded shell function
	# would leave $! naming a subshell, and the cleanup would never stop the agent.
	local home
	home=$(getent passwd "$E2E_USER" | cut -d: -f6)
	(exec setpriv --reuid="$E2E_USER" --regid="$E2E_USER" --init-groups \
		env -i HOME="$home" USER="$E2E_USER" LOGNAME="$E2E_USER" PATH="$JOB_PATH" LANG=C.UTF-8 \
		jobgate agent --relay "127.0.0.1:$QUIC_PORT" --relay-ca "$CA" --token-file "$token" \
		--url-file "$UWORK/$label.url" -- python3 "$WORK/bin/cross-session-app.py" \
		--port '{port}' --label "$label") >"$WORK/$label.log" 2>&1 &
	JOB_PID=$!
}
t=$(now_ms)
start_job victim "$UWORK/token"
VICTIM_PID=$JOB_PID
start_job attacker "$UWORK/attacker-token"
ATTACKER_PID=$JOB_PID
VICTIM_URL=$(wait_for_file_line "$UWORK/victim.url" 60) || die "no victim URL within 60 s"
ATTACKER_URL=$(wait_for_file_line "$UWORK/attacker.url" 60) || die "no attacker URL within 60 s"
log "agents up in $(since "$t") s"
case $VICTIM_URL in *jobgate_key=*) ;; *) die "the victim's URL carries no access key" ;; esac
[ "$(session_root "$VICTIM_URL")" != "$(session_root "$ATTACKER_URL")" ] || die "one URL for both sessions"

SPKI=$(openssl x509 -in "$WORK/pki/cert.pem" -pubkey -noout |
	openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64)
t=$(now_ms)
JG_VICTIM_URL=$VICTIM_URL JG_ATTACKER_URL=$ATTACKER_URL JG_DOMAIN=$E2E_DOMAIN JG_SPKI=$SPKI \
	JG_NODE_PREFIX=$NODE_PREFIX node "$E2E_DIR/cross-session-browser.mjs" ||
	die "the browser steps failed"
log "browser steps done in $(since "$t") s"

# The same facts from the apps' own logs ("[app LABEL] METHOD target origin=... cookies=...").
grep -q '^\[app attacker\] GET /attack.html' "$WORK/attacker.log" || die "the attacker's page was never served"
grep -q '^\[app victim\] POST /echo?from=own' "$WORK/victim.log" || die "the victim's own POST is not in its log"
if grep '^\[app victim\].*from=attack' "$WORK/victim.log" >&2; then
	die "the victim's app saw the attack's requests (above)"
fi
log "the victim's app saw none of the attack's requests"
# The browser holds both sessions' access cookies; neither app ever receives one (the
# relay strips its own; the other's is host-only and never sent to a sibling).
if grep -h '^\[app .*cookies=.*__Host-jobgate' "$WORK/victim.log" "$WORK/attacker.log" >&2; then
	die "an app received a jobgate access cookie (above)"
fi
log "no app received a jobgate access cookie"
# Cookie tossing is not the relay's to stop (the Public Suffix List listing is: see
# docs/admin-guide.md); say what this domain allows.
if grep -q '^\[app victim\].*cookies=.*jobgate_e2e_tossed' "$WORK/victim.log"; then
	log "note: the attacker's parent-domain cookie reached the victim's app ($E2E_DOMAIN is no public suffix)"
else
	log "the attacker's parent-domain cookie did not reach the victim's app"
fi
