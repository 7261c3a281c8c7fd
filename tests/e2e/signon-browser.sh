#!/usr/bin/env bash
# Browser end-to-end test of owner-only sessions through single sign-on, with a real
# OpenID provider (npm oidc-provider, tests/oidc/op.mjs) and headless Chromium:
#
#   alice opens her job's URL → the provider's login form → back on the exact page; her
#   second job opens without the provider; bob (signed in) gets 403 on alice's job, gets
#   into the job alice started with --share bob; bob's logout ends his passes; and
#   `jobgate login` (as the job user, in the background) gets carol a token through the
#   browser, which then opens a session.
#
# Needs root (installs, useradd, setpriv). Installs on first run: chromium (apt),
# playwright-core and oidc-provider (npm).
# Usage: tests/e2e/signon-browser.sh   (JOBGATE_BIN=path/to/jobgate to test another build)
# Prints PASS or FAIL with timings; exit status 0 only on PASS.

# shellcheck source=tests/e2e/common.sh
source "$(dirname "$0")/common.sh"

OP_PID=
LOGIN_PID=
JOB_PIDS=()
cleanup() {
	local code=$?
	for pid in "${JOB_PIDS[@]}" "$LOGIN_PID" "$OP_PID"; do stop_pid "$pid"; done
	if [ $code -ne 0 ] && [ -n "${WORK:-}" ]; then
		for f in "$WORK"/*.log; do
			[ -f "$f" ] && { echo "--- $f (last 30 lines)" >&2; tail -n 30 "$f" >&2; }
		done
	fi
	cleanup_common
	if [ $code -eq 0 ]; then
		echo "signon-browser: PASS in $(since "$T0") s"
	else
		echo "signon-browser: FAIL (exit $code) after $(since "$T0") s"
	fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and runs the jobs as $E2E_USER)"

t=$(now_ms)
ensure_base_tools
apt_install chromium python3 openssl
ensure_node_modules
bash "$E2E_DIR/../oidc/install.sh"
ensure_user
log "setup done in $(since "$t") s"

make_workdir
HTTPS_PORT=$(free_port tcp)
QUIC_PORT=$(free_port udp)
OP_PORT=$(free_port tcp)
"$JOBGATE_BIN" dev-cert --domain "$E2E_DOMAIN" --out "$WORK/pki" >/dev/null
chmod 755 "$WORK/pki"
chmod 644 "$WORK/pki/ca.pem"
CA=$WORK/pki/ca.pem
CLIENT_SECRET=$(openssl rand -hex 24)
install -m 600 /dev/null "$WORK/relay/oidc-secret"
printf '%s\n' "$CLIENT_SECRET" >"$WORK/relay/oidc-secret"

# The provider (same test certificate: it covers localhost).
mkdir -p "$WORK/op"
cp "$E2E_DIR/../oidc/op.mjs" "$WORK/op/"
ln -s "${JOBGATE_OP_HOME:-/opt/jobgate-e2e/oidc}/node_modules" "$WORK/op/node_modules"
OP_PORT=$OP_PORT OP_CERT=$WORK/pki/cert.pem OP_KEY=$WORK/pki/key.pem OP_CLIENT_ID=jobgate \
	OP_CLIENT_SECRET=$CLIENT_SECRET OP_REDIRECT_URI="https://login.$E2E_DOMAIN:$HTTPS_PORT/callback" \
	node "$WORK/op/op.mjs" >"$WORK/op.log" 2>&1 &
OP_PID=$!
for _ in $(seq 300); do
	grep -q '^op ready' "$WORK/op.log" && break
	kill -0 "$OP_PID" 2>/dev/null || die "the provider exited"
	sleep 0.1
done
grep -q '^op ready' "$WORK/op.log" || die "the provider did not start"

# alice's relay token goes to the job user (relay user names are the IdP's, not Unix's).
"$JOBGATE_BIN" token issue --tokens "$WORK/relay/tokens.toml" --user alice 2>/dev/null >"$WORK/relay/token.tmp"
install -m 600 -o "$E2E_USER" -g "$E2E_USER" "$WORK/relay/token.tmp" "$UWORK/token"
rm -f "$WORK/relay/token.tmp"
"$JOBGATE_BIN" relay --domain "$E2E_DOMAIN" --cert "$WORK/pki/cert.pem" --key "$WORK/pki/key.pem" \
	--tokens "$WORK/relay/tokens.toml" \
	--listen-https "127.0.0.1:$HTTPS_PORT" --listen-quic "127.0.0.1:$QUIC_PORT" \
	--oidc-issuer "https://localhost:$OP_PORT" --oidc-client-id jobgate \
	--oidc-client-secret-file "$WORK/relay/oidc-secret" --oidc-ca "$CA" \
	>"$WORK/relay.log" 2>&1 &
RELAY_PID=$!
for _ in $(seq 100); do
	curl -s -o /dev/null --cacert "$CA" "https://localhost:$HTTPS_PORT/" && break
	kill -0 "$RELAY_PID" 2>/dev/null || die "the relay exited"
	sleep 0.1
done
log "provider on $OP_PORT, relay on $HTTPS_PORT"

# start_job LABEL TOKEN_FILE FLAGS...: an agent (as the job user) running the demo app.
start_job() {
	local label=$1 token=$2 home
	shift 2
	home=$(getent passwd "$E2E_USER" | cut -d: -f6)
	(exec setpriv --reuid="$E2E_USER" --regid="$E2E_USER" --init-groups \
		env -i HOME="$home" USER="$E2E_USER" LOGNAME="$E2E_USER" PATH="$JOB_PATH" LANG=C.UTF-8 \
		jobgate agent --relay "127.0.0.1:$QUIC_PORT" --relay-ca "$CA" --token-file "$token" \
		--url-file "$UWORK/$label.url" "$@" -- jobgate demo-app --listen '127.0.0.1:{port}' \
		--label "$label") >"$WORK/$label.log" 2>&1 &
	JOB_PIDS+=($!)
}
start_job own "$UWORK/token"
start_job shared "$UWORK/token" --share bob
OWN_URL=$(wait_for_file_line "$UWORK/own.url" 60) || die "no URL for alice's job"
SHARED_URL=$(wait_for_file_line "$UWORK/shared.url" 60) || die "no URL for the shared job"
case $OWN_URL in *jobgate_key=*) die "an owner session printed a link key" ;; esac

# `jobgate login` as the job user, in the background: its URL goes to the browser.
home=$(getent passwd "$E2E_USER" | cut -d: -f6)
(exec setpriv --reuid="$E2E_USER" --regid="$E2E_USER" --init-groups \
	env -i HOME="$home" USER="$E2E_USER" PATH="$JOB_PATH" \
	jobgate login --relay "localhost:$HTTPS_PORT" --relay-ca "$CA" --token-file "$UWORK/login-token") \
	>"$WORK/login.log" 2>&1 &
LOGIN_PID=$!
for _ in $(seq 300); do
	grep -q '/device?code=' "$WORK/login.log" && break
	sleep 0.1
done
LOGIN_URL=$(grep -o 'https://[^ ]*/device?code=[A-Z0-9-]*' "$WORK/login.log" | head -n1)
[ -n "$LOGIN_URL" ] || die "jobgate login printed no address"

SPKI=$(openssl x509 -in "$WORK/pki/cert.pem" -pubkey -noout |
	openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64)
t=$(now_ms)
JG_OWN_URL="${OWN_URL%/}/?from=e2e" JG_SHARED_URL=$SHARED_URL JG_LOGIN_URL=$LOGIN_URL \
	JG_OP_ORIGIN="https://localhost:$OP_PORT" JG_DOMAIN=$E2E_DOMAIN JG_SPKI=$SPKI \
	JG_NODE_PREFIX=$NODE_PREFIX node "$E2E_DIR/signon-browser.mjs" || die "the browser steps failed"
log "browser steps done in $(since "$t") s"

for _ in $(seq 100); do kill -0 "$LOGIN_PID" 2>/dev/null || break; sleep 0.1; done
wait "$LOGIN_PID" || die "jobgate login failed"
LOGIN_PID=
[ "$(stat -c '%a %U' "$UWORK/login-token")" = "600 $E2E_USER" ] || die "the login token is not the user's 0600 file"
"$JOBGATE_BIN" token list --tokens "$WORK/relay/tokens.toml" | grep -q '^carol origin=login expires=' ||
	die "token list does not show carol's login token"
start_job carol "$UWORK/login-token"
wait_for_file_line "$UWORK/carol.url" 60 >/dev/null || die "carol's login token opened no session"
log "jobgate login: token written 0600, listed with origin and expiry, opens a session"
if grep -F -e "$CLIENT_SECRET" -e "$(cat "$UWORK/login-token")" "$WORK/relay.log" >&2; then
	die "a secret in the relay's log"
fi
