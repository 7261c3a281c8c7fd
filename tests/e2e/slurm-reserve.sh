#!/usr/bin/env bash
# Slurm end-to-end test of the URL at submit time (issue #16, item 1), run for real as an
# ordinary user on the one-node Slurm of slurm-setup.sh (run that first).
#
#   launch --no-wait -- python3 -m http.server {port}
#       prints the URL at once (before the job has run) and exits 0;
#       the reservation file is private (0600 in the 0700 jobs directory);
#       the same URL then serves the job's directory listing, without a new link;
#   cancel → the URL answers 404 within 10 s; replaying the reservation is refused;
#   a job that cannot start (its partition DOWN): the reserved URL's page says "queued"
#   with Slurm's reason (the relay runs `scontrol show job -o {job}`), 404 without the key;
#   scancel → the page says "cancelled", then the URL answers 404 after the grace;
#   in Chromium: a held job's URL (scontrol hold) shows the queued page with JobHeldAdmin,
#   and after scontrol release the same tab shows the app without the test reloading it.
# Prints PASS or FAIL with timings; exit status 0 only on PASS.

# shellcheck source=tests/e2e/common.sh
source "$(dirname "$0")/common.sh"

JOBS=()
PART=
cleanup() {
	local code=$?
	local id
	for id in "${JOBS[@]}"; do
		scancel "$id" 2>/dev/null || true
	done
	[ -n "$PART" ] && scontrol update PartitionName="$PART" State=UP 2>/dev/null
	if [ $code -ne 0 ] && [ -n "${WORK:-}" ]; then
		for f in "$WORK"/*.err "$WORK/relay.log"; do
			[ -f "$f" ] && { echo "--- $f (last 30 lines)" >&2; tail -n 30 "$f" >&2; }
		done
	fi
	cleanup_common
	if [ $code -eq 0 ]; then
		echo "slurm-reserve: PASS in $(since "$T0") s"
	else
		echo "slurm-reserve: FAIL (exit $code) after $(since "$T0") s"
	fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "run as root (it runs jobgate as $E2E_USER)"
scontrol ping 2>/dev/null | grep -q 'is UP' || die "Slurm is not running: run tests/e2e/slurm-setup.sh first"
ensure_base_tools
ensure_venv
ensure_user

make_workdir
RELAY_EXTRA_ARGS=(--slurm-status "scontrol show job -o {job}" --queued-end-grace 3)
start_relay
USER_HOME=$(getent passwd "$E2E_USER" | cut -d: -f6)
JOBS_DIR=$USER_HOME/.jobgate/jobs
SERVE=$UWORK/serve
install -d -m 700 -o "$E2E_USER" -g "$E2E_USER" "$SERVE"
MARKER=marker-$RANDOM$RANDOM.txt
install -m 644 -o "$E2E_USER" -g "$E2E_USER" /dev/null "$SERVE/$MARKER"

jg() {
	(cd "$SERVE" && as_user JOBGATE_RELAY="127.0.0.1:$QUIC_PORT" JOBGATE_RELAY_CA="$CA" \
		JOBGATE_TOKEN_FILE="$UWORK/token" jobgate "$@")
}
job_of() { sed -n 's/.*job \([0-9][0-9_]*\)[ ;:,.].*/\1/p' "$1" | head -n1; }

# --- launch --no-wait: the URL at once ---------------------------------------------------
t=$(now_ms)
URL=$(jg launch --no-wait --time 0:10:00 -- python3 -m http.server '{port}' --bind 127.0.0.1 \
	2>"$WORK/launch.err") || die "launch --no-wait failed: $(cat "$WORK/launch.err")"
submit_secs=$(since "$t")
JOB=$(sed -n 's/.*jobgate cancel \([0-9][0-9_]*\).*/\1/p' "$WORK/launch.err" | head -n1)
[ -n "$JOB" ] && JOBS+=("$JOB")
[ -n "$JOB" ] || die "no job id in launch's messages: $(cat "$WORK/launch.err")"
case $URL in https://*.$E2E_DOMAIN:*\?jobgate_key=*) ;; *) die "launch --no-wait printed ${URL@Q}, not a session link" ;; esac
log "launch --no-wait -> URL in $submit_secs s (job $JOB): $URL"

RES=$JOBS_DIR/$JOB.reservation
[ "$(stat -c %a "$RES")" = 600 ] || die "the reservation file has mode $(stat -c %a "$RES" 2>&1)"
[ "$(stat -c %a "$JOBS_DIR")" = 700 ] || die "$JOBS_DIR has mode $(stat -c %a "$JOBS_DIR")"
if scontrol show job "$JOB" 2>/dev/null | grep -q "$(head -n1 "$RES")"; then
	die "the reservation shows in scontrol show job"
fi
log "the reservation is private and not in Slurm's job record"

# --- the same URL serves the app once the job runs ------------------------------------
served=
for _ in $(seq 600); do
	listing=$(relay_curl -w '\n%{http_code}' "$URL" 2>/dev/null || true)
	if [ "${listing##*$'\n'}" = 200 ]; then
		served=$(since "$t")
		break
	fi
	sleep 0.2
done
[ -n "$served" ] || die "the reserved URL never served the app"
grep -q "$MARKER" <<<"$listing" || die "the listing does not show $MARKER: $listing"
grep -qF "\"url\": \"$URL\"" "$JOBS_DIR/$JOB.json" || die "the agent did not get the reserved URL: $(cat "$JOBS_DIR/$JOB.json")"
log "the reserved URL serves the job's app $served s after submission"

# --- cancel: 404, and the reservation cannot be replayed --------------------------------
ROOT=$(session_root "$URL")
cp "$RES" "$WORK/replay.reservation"
t=$(now_ms)
jg cancel "$JOB" 2>"$WORK/cancel.err" || die "cancel failed: $(cat "$WORK/cancel.err")"
gone=
for _ in $(seq 100); do
	if [ "$(status_of "$ROOT")" = 404 ]; then
		gone=$(since "$t")
		break
	fi
	sleep 0.1
done
[ -n "$gone" ] || die "the URL did not answer 404 within 10 s of cancel"
log "cancel -> the URL answers 404 after $gone s"

install -m 600 -o "$E2E_USER" -g "$E2E_USER" "$WORK/replay.reservation" "$UWORK/replay.reservation"
set +e
(cd "$SERVE" && as_user SLURM_JOB_ID="$JOB" timeout 30 jobgate agent --relay "127.0.0.1:$QUIC_PORT" \
	--relay-ca "$CA" --token-file "$UWORK/token" --no-job-file \
	--reservation-file "$UWORK/replay.reservation" -- python3 -m http.server '{port}' --bind 127.0.0.1) \
	2>"$WORK/replay.err"
code=$?
set -e
[ "$code" = 3 ] || die "a replayed reservation: agent exit $code, expected 3 (refused): $(cat "$WORK/replay.err")"
grep -q "has ended" "$WORK/replay.err" || die "the refusal does not say why: $(cat "$WORK/replay.err")"
log "replaying the reservation after the job is refused: $(grep -m1 'ended' "$WORK/replay.err")"

# --- a job that cannot start: its URL's page says queued, why, then cancelled, then 404 --
PART=$(scontrol show partition -o | sed -n 's/^PartitionName=\([^ ]*\).*/\1/p' | head -n1)
[ -n "$PART" ] || die "no Slurm partition"
scontrol update PartitionName="$PART" State=DOWN
URLQ=$(jg launch --no-wait --time 0:10:00 -- python3 -m http.server '{port}' --bind 127.0.0.1 \
	2>"$WORK/launch-q.err") || die "launch --no-wait (partition down) failed: $(cat "$WORK/launch-q.err")"
JOBQ=$(sed -n 's/.*jobgate cancel \([0-9][0-9_]*\).*/\1/p' "$WORK/launch-q.err" | head -n1)
[ -n "$JOBQ" ] && JOBS+=("$JOBQ")
ROOTQ=$(session_root "$URLQ")
STATUSQ="${ROOTQ}.jobgate/status?${URLQ#*\?}"
state_of() { relay_curl "$STATUSQ" 2>/dev/null | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["state"], s.get("reason") or "-")' 2>/dev/null || echo "none -"; }
queued=
# (Right after submission Slurm may not have scheduled the job yet: Reason=None.)
for _ in $(seq 150); do
	read -r st reason <<<"$(state_of)"
	[ "$st" = queued ] && [ "$reason" != None ] && [ "$reason" != - ] && { queued=1; break; }
	sleep 0.2
done
[ -n "$queued" ] || die "the reserved URL of a queued job does not say queued: $(relay_curl "$STATUSQ" 2>&1)"
[ "$reason" = PartitionDown ] || die "the page gives reason ${reason@Q}, expected PartitionDown"
relay_curl "$URLQ" | grep -q 'PartitionDown' || die "the page does not show the reason: $(relay_curl "$URLQ")"
[ "$(status_of "$ROOTQ")" = 404 ] || die "without its key the queued URL answers $(status_of "$ROOTQ"), not 404"
log "queued job $JOBQ: its URL says queued (reason $reason); without the key: 404"
scancel "$JOBQ"
t=$(now_ms)
cancelled=
for _ in $(seq 100); do
	read -r st reason <<<"$(state_of)"
	[ "$st" = cancelled ] && { cancelled=$(since "$t"); break; }
	sleep 0.2
done
[ -n "$cancelled" ] || die "the page never said cancelled: $(relay_curl "$STATUSQ" 2>&1)"
ended=
for _ in $(seq 150); do
	[ "$(status_of "${URLQ}")" = 404 ] && { ended=$(since "$t"); break; }
	sleep 0.2
done
[ -n "$ended" ] || die "the cancelled job's URL did not end after the grace"
log "scancel -> the page says cancelled after $cancelled s, the URL answers 404 after $ended s (grace 3 s)"

# --- in a browser: the queued page turns into the app by itself ----------------------------
ensure_node_modules
URLB=$(jg launch --no-wait --time 0:10:00 -- python3 -m http.server '{port}' --bind 127.0.0.1 \
	2>"$WORK/launch-b.err") || die "launch --no-wait (browser) failed: $(cat "$WORK/launch-b.err")"
JOBB=$(sed -n 's/.*jobgate cancel \([0-9][0-9_]*\).*/\1/p' "$WORK/launch-b.err" | head -n1)
[ -n "$JOBB" ] && JOBS+=("$JOBB")
# Held (as an admin holds a job), then the partition back up: queued for that reason alone.
scontrol hold "$JOBB"
scontrol update PartitionName="$PART" State=UP
PART=
SPKI=$(openssl x509 -in "$WORK/pki/cert.pem" -pubkey -noout |
	openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64)
SIGNAL=$WORK/browser-saw-queued
t=$(now_ms)
JG_URL=$URLB JG_REASON=JobHeldAdmin JG_MARKER=$MARKER JG_SIGNAL=$SIGNAL JG_DOMAIN=$E2E_DOMAIN \
	JG_SPKI=$SPKI JG_NODE_PREFIX=$NODE_PREFIX node "$E2E_DIR/reserve-browser.mjs" 2>"$WORK/browser.err" &
BROWSER_PID=$!
for _ in $(seq 300); do
	[ -f "$SIGNAL" ] && break
	kill -0 "$BROWSER_PID" 2>/dev/null || break
	sleep 0.2
done
[ -f "$SIGNAL" ] || { cat "$WORK/browser.err" >&2; die "the browser did not see the queued page"; }
scontrol release "$JOBB"
wait "$BROWSER_PID" || { cat "$WORK/browser.err" >&2; die "the browser tab did not turn into the app"; }
log "browser: held job's page (JobHeldAdmin), then after scontrol release the app in the same tab $(since "$t") s after opening; $(grep -m1 'navigated itself' "$WORK/browser.err")"
log "timings: launch --no-wait -> URL ${submit_secs} s; submit -> app ${served} s; cancel -> 404 ${gone} s"
