#!/usr/bin/env bash
# Slurm end-to-end test of `jobgate launch`, `jobgate jobs` and `jobgate cancel`, run for
# real as an ordinary user on the one-node Slurm of slurm-setup.sh (run that first).
#
#   launch -- python3 -m http.server {port}   prints a URL serving the directory listing
#   jobs                                      lists the job with its URL
#   cancel                                    ends it; the URL answers 404 within 10 s
#   launch --dry-run                          prints a script that passes `bash -n`
#   launch --partition <bad>                  Slurm's message, non-zero exit
#   launch -- <app that exits at once>        the tail of the job's output, non-zero exit
#   launch with a token the relay refuses     says so, non-zero exit
#   launch --jupyter                          reaches JupyterLab
#
# The relay, its CA and the token file reach `launch` as JOBGATE_RELAY, JOBGATE_RELAY_CA
# and JOBGATE_TOKEN_FILE. Prints PASS or FAIL with timings; exit status 0 only on PASS.

# shellcheck source=tests/e2e/common.sh
source "$(dirname "$0")/common.sh"

JOBS=()
cleanup() {
	local code=$?
	local id
	for id in "${JOBS[@]}"; do
		scancel "$id" 2>/dev/null || true
	done
	if [ $code -ne 0 ] && [ -n "${WORK:-}" ]; then
		for f in "$WORK"/*.err "$WORK/relay.log"; do
			[ -f "$f" ] && { echo "--- $f (last 30 lines)" >&2; tail -n 30 "$f" >&2; }
		done
	fi
	cleanup_common
	if [ $code -eq 0 ]; then
		echo "slurm-launch: PASS in $(since "$T0") s"
	else
		echo "slurm-launch: FAIL (exit $code) after $(since "$T0") s"
	fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "run as root (it runs jobgate as $E2E_USER)"
scontrol ping 2>/dev/null | grep -q 'is UP' || die "Slurm is not running: run tests/e2e/slurm-setup.sh first"
ensure_base_tools
ensure_venv
ensure_user

make_workdir
start_relay
USER_HOME=$(getent passwd "$E2E_USER" | cut -d: -f6)
JOBS_DIR=$USER_HOME/.jobgate/jobs
SERVE=$UWORK/serve
install -d -m 700 -o "$E2E_USER" -g "$E2E_USER" "$SERVE"
MARKER=marker-$RANDOM$RANDOM.txt
install -m 644 -o "$E2E_USER" -g "$E2E_USER" /dev/null "$SERVE/$MARKER"

# jobgate as the job user, in $SERVE, with the relay settings in the environment
# (`jg timeout ...` runs another command there, e.g. `timeout -s INT 4 jobgate ...`).
jg() {
	local program=jobgate
	[ "$1" = timeout ] && program=
	(cd "$SERVE" && as_user JOBGATE_RELAY="127.0.0.1:$QUIC_PORT" JOBGATE_RELAY_CA="$CA" \
		JOBGATE_TOKEN_FILE="$UWORK/token" $program "$@")
}
# The job id from launch's messages in $1.
job_of() { sed -n 's/.*job \([0-9][0-9_]*\) .*/\1/p' "$1" | head -n1; }

# --- launch a plain command ----------------------------------------------------------
t=$(now_ms)
URL=$(jg launch --time 0:10:00 -- python3 -m http.server '{port}' --bind 127.0.0.1 2>"$WORK/launch.err") ||
	die "launch failed: $(cat "$WORK/launch.err")"
submit_to_url=$(since "$t")
JOB=$(job_of "$WORK/launch.err")
[ -n "$JOB" ] && JOBS+=("$JOB")
[ -n "$JOB" ] || die "no job id in launch's messages: $(cat "$WORK/launch.err")"
case $URL in https://*.$E2E_DOMAIN:*) ;; *) die "launch printed ${URL@Q}, not a session URL" ;; esac
log "launch -> URL in $submit_to_url s (job $JOB): $URL"
grep -q 'jobgate cancel' "$WORK/launch.err" || die "launch does not say how to end the job"

# The key in the URL lets a non-navigation request through as is.
listing=$(relay_curl -w '\n%{http_code}' "$URL") || die "GET $URL failed"
[ "${listing##*$'\n'}" = 200 ] || die "the URL answered ${listing##*$'\n'}"
grep -q 'Directory listing for /' <<<"$listing" || die "not a directory listing: $listing"
grep -q "$MARKER" <<<"$listing" || die "the listing does not show $MARKER (wrong directory?)"
log "the URL serves the job's directory listing through the relay"

# The job file: private, with the URL.
[ "$(stat -c %a "$JOBS_DIR")" = 700 ] || die "$JOBS_DIR has mode $(stat -c %a "$JOBS_DIR")"
[ "$(stat -c %a "$JOBS_DIR/$JOB.json")" = 600 ] || die "the job file has mode $(stat -c %a "$JOBS_DIR/$JOB.json")"
grep -qF "\"url\": \"$URL\"" "$JOBS_DIR/$JOB.json" || die "the job file lacks the URL: $(cat "$JOBS_DIR/$JOB.json")"

# --- jobs ------------------------------------------------------------------------------
jobs_out=$(jg jobs 2>"$WORK/jobs.err") || die "jobs failed: $(cat "$WORK/jobs.err")"
row=$(grep "^$JOB " <<<"$jobs_out" || true)
[ -n "$row" ] || die "jobs does not list job $JOB: $jobs_out"
grep -qF "$URL" <<<"$row" || die "jobs shows no URL for $JOB: $row"
grep -q ' running ' <<<"$row" || die "jobs does not say running: $row"
log "jobs lists it: $(tr -s ' ' <<<"$row" | cut -c1-90)..."

# --- cancel ----------------------------------------------------------------------------
ROOT=$(session_root "$URL")
t=$(now_ms)
jg cancel "$JOB" 2>"$WORK/cancel.err" || die "cancel failed: $(cat "$WORK/cancel.err")"
cancel_secs=$(since "$t")
gone=
for _ in $(seq 100); do
	if [ "$(status_of "$ROOT")" = 404 ]; then
		gone=$(since "$t")
		break
	fi
	sleep 0.1
done
[ -n "$gone" ] || die "the URL did not answer 404 within 10 s of cancel"
state=$(squeue -h -t all -j "$JOB" -o %T 2>/dev/null || true)
case $state in "" | CANCELLED | COMPLETED) ;; *) die "job $JOB is $state after cancel returned" ;; esac
log "cancel returned after $cancel_secs s (job ${state:-gone}); the URL answered 404 after $gone s"
[ ! -e "$JOBS_DIR/$JOB.json" ] || die "cancel left the job file behind"
# Slurm reports the job CANCELLED as soon as it signals the job; its processes (the
# agent saying Bye, then stopping the app) finish exiting a moment later. They must be
# gone well within Slurm's KillWait (5 s here), after which they would be SIGKILLed.
left=
for _ in $(seq 50); do
	left=$(pgrep -u "$E2E_USER" -f 'http[.]server|jobgate agent' | tr '\n' ' ' || true)
	[ -z "$left" ] && break
	sleep 0.1
done
[ -z "$left" ] || die "processes of the job remain 5 s after cancel returned: $(ps -o pid=,args= -p "${left// /,}" 2>/dev/null)"
log "no process of the job is left $(since "$t") s after cancel started"
jobs_out=$(jg jobs 2>&1) || die "jobs failed: $jobs_out"
! grep -q "^$JOB .*running" <<<"$jobs_out" || die "jobs still lists $JOB as running: $jobs_out"

# --- dry run ---------------------------------------------------------------------------
jg launch --dry-run --partition debug --mem 200M --cpus 1 -J "it's mine" \
	-- python3 -m http.server '{port}' --bind 127.0.0.1 >"$WORK/dry.sh" 2>"$WORK/dry.err" ||
	die "launch --dry-run failed: $(cat "$WORK/dry.err")"
bash -n "$WORK/dry.sh" || die "the --dry-run script does not pass bash -n: $(cat "$WORK/dry.sh")"
grep -qx '#SBATCH --partition=debug' "$WORK/dry.sh" || die "no partition line in: $(cat "$WORK/dry.sh")"
grep -qx "#SBATCH --job-name=\"it's mine\"" "$WORK/dry.sh" || die "job name not quoted for sbatch: $(cat "$WORK/dry.sh")"
grep -q "^exec .*jobgate agent .* -- python3 -m http.server '{port}' --bind 127.0.0.1\$" "$WORK/dry.sh" ||
	die "no agent line in: $(cat "$WORK/dry.sh")"
log "--dry-run prints a script that passes bash -n"

# --- a queued job: Ctrl-C leaves it queued, jobs shows why it waits, cancel ends it ------
# (--template: a user's own template, here one that holds the job back for an hour)
install -m 644 -o "$E2E_USER" -g "$E2E_USER" /dev/stdin "$UWORK/later.sbatch" <<'EOF'
#!/bin/bash
{{sbatch_options}}
#SBATCH --begin=now+1hour
cd {{workdir}} || exit 1
exec {{agent}}
EOF
code=0
jg timeout --preserve-status -s INT 4 jobgate launch --template "$UWORK/later.sbatch" \
	-- python3 -m http.server '{port}' --bind 127.0.0.1 >/dev/null 2>"$WORK/later.err" || code=$?
LJOB=$(job_of "$WORK/later.err")
[ -n "$LJOB" ] && JOBS+=("$LJOB")
[ "$code" = 130 ] || die "launch interrupted by SIGINT exited $code, want 130: $(cat "$WORK/later.err")"
grep -q "queued (BeginTime)" "$WORK/later.err" || die "no 'queued (BeginTime)' progress: $(cat "$WORK/later.err")"
grep -q "keeps running" "$WORK/later.err" || die "Ctrl-C does not say the job keeps running: $(cat "$WORK/later.err")"
grep -q "jobgate cancel $LJOB" "$WORK/later.err" || die "Ctrl-C does not say how to end it: $(cat "$WORK/later.err")"
[ "$(squeue -h -j "$LJOB" -o %T)" = PENDING ] || die "job $LJOB is not pending after Ctrl-C"
row=$(jg jobs 2>/dev/null | grep "^$LJOB " || true)
grep -q 'pending .*(queued: BeginTime)' <<<"$row" || die "jobs does not show the queued job: $row"
jg cancel "$LJOB" 2>"$WORK/cancel3.err" || die "cancel of a queued job failed: $(cat "$WORK/cancel3.err")"
log "Ctrl-C leaves a queued job queued; jobs shows it ($(tr -s ' ' <<<"$row")); cancel ends it"

# --- a partition Slurm does not have ----------------------------------------------------
if jg launch --partition no-such-partition -- python3 -m http.server '{port}' >/dev/null 2>"$WORK/badpart.err"; then
	die "launch with a bad partition succeeded"
fi
grep -q 'sbatch refused' "$WORK/badpart.err" || die "no refusal message: $(cat "$WORK/badpart.err")"
grep -qi 'invalid partition' "$WORK/badpart.err" || die "Slurm's message is missing: $(cat "$WORK/badpart.err")"
log "a bad partition: $(grep -i 'invalid partition' "$WORK/badpart.err" | head -n1 | sed 's/^ *//')"

# --- an app that exits at once ---------------------------------------------------------
t=$(now_ms)
if jg launch --time 0:05:00 -- bash -c 'echo "app failing on purpose (port $1)"; exit 3' app '{port}' \
	>/dev/null 2>"$WORK/appfail.err"; then
	die "launch of a failing app succeeded"
fi
id=$(job_of "$WORK/appfail.err")
[ -n "$id" ] && JOBS+=("$id")
grep -q 'ended.*before the URL' "$WORK/appfail.err" || die "no 'ended before the URL': $(cat "$WORK/appfail.err")"
grep -q '| .*app failing on purpose' "$WORK/appfail.err" || die "no output tail: $(cat "$WORK/appfail.err")"
log "a failing app: reported with its output tail in $(since "$t") s"

# --- a token the relay refuses ---------------------------------------------------------
as_user sh -c "umask 077 && echo not-a-valid-token > '$UWORK/bad-token'"
t=$(now_ms)
if jg launch --token-file "$UWORK/bad-token" -- python3 -m http.server '{port}' --bind 127.0.0.1 \
	>/dev/null 2>"$WORK/badtoken.err"; then
	die "launch with a bad token succeeded"
fi
id=$(job_of "$WORK/badtoken.err")
[ -n "$id" ] && JOBS+=("$id")
grep -q 'refused' "$WORK/badtoken.err" || die "the refusal is not reported: $(cat "$WORK/badtoken.err")"
log "a refused token: reported in $(since "$t") s: $(grep -m1 'agent said' "$WORK/badtoken.err" | cut -c1-100)"

# --- JupyterLab ------------------------------------------------------------------------
t=$(now_ms)
JURL=$(jg launch --time 0:10:00 --jupyter 2>"$WORK/jupyter.err") ||
	die "launch --jupyter failed: $(cat "$WORK/jupyter.err")"
jupyter_secs=$(since "$t")
JJOB=$(job_of "$WORK/jupyter.err")
[ -n "$JJOB" ] && JOBS+=("$JJOB")
log "launch --jupyter -> URL in $jupyter_secs s (job $JJOB)"
JAR=$WORK/cookies
page=$(relay_curl -L -b "$JAR" -c "$JAR" -H 'Sec-Fetch-Mode: navigate' -H 'Accept: text/html' \
	-w '\n%{http_code}' "$JURL") || die "GET $JURL failed"
[ "${page##*$'\n'}" = 200 ] || die "the Jupyter URL answered ${page##*$'\n'}"
grep -q '<title>JupyterLab</title>' <<<"$page" || die "the URL is not JupyterLab"
log "the printed link logs straight into JupyterLab"
t=$(now_ms)
jg cancel "$JJOB" 2>"$WORK/cancel2.err" || die "cancel failed: $(cat "$WORK/cancel2.err")"
[ "$(status_of "$(session_root "$JURL")")" = 404 ] || die "the Jupyter URL still answers after cancel"
log "cancelled JupyterLab's job in $(since "$t") s; its URL answers 404"

# --- tidy: jobs forgets ended jobs --------------------------------------------------------
jg jobs >/dev/null 2>&1 || true
left=$(find "$JOBS_DIR" -name '*.json' -newer "$WORK/relay.log" 2>/dev/null | wc -l)
[ "$left" = 0 ] || die "job files of ended jobs remain: $(ls "$JOBS_DIR")"
JOBS=()
log "timings: launch -> URL ${submit_to_url} s (http.server), ${jupyter_secs} s (JupyterLab); cancel -> 404 ${gone} s"
