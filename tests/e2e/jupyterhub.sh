#!/usr/bin/env bash
# JupyterHub end-to-end test: contrib/jupyterhub's JobgateSlurmSpawner with a real
# JupyterHub, batchspawner, configurable-http-proxy, the one-node Slurm of slurm-setup.sh
# (run that first), a relay with --allow-public, and Chromium.
#
#   Chromium -> hub (CHP, http://127.0.0.1) -> login -> spawn: sbatch as $E2E_USER ->
#   `srun jobgate agent --access public -- jupyterhub-singleuser` -> the spawner reads the
#   URL from the job file, checks it, hands it to the hub -> CHP routes /user/<name>/ to
#   https://<name>.<domain> (the relay) -> notebook print(6*7) -> 42 -> stop from the hub
#   home page -> scancel -> the jobgate URL answers 404, the route is gone.
# Also: the spawner refuses URLs outside the relay's domain; the job listens on loopback
# only; a direct hit on the relay URL (no hub login) does not reach the server.
#
# Nothing connects to the compute node: the hub and CHP reach the relay only. Session
# names resolve to loopback through /etc/hosts lines (marked, removed at the end) that a
# watcher adds as job files appear; the hub retries its first check until they do.
# Prints PASS or FAIL; exit 0 only on PASS.

# shellcheck source=tests/e2e/common.sh
source "$(dirname "$0")/common.sh"

HOSTS_MARK="# jobgate-e2e-jupyterhub"
HUB_PID=
WATCH_PID=
cleanup() {
	local code=$?
	stop_pid "$HUB_PID"
	stop_pid "$WATCH_PID"
	# Jobs the hub left (it cancels its own on a clean stop).
	squeue -h -u "$E2E_USER" -n spawner-jupyterhub -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
	# Rewritten in place, not renamed over: /etc/hosts may be a bind mount (containers).
	if grep -q "$HOSTS_MARK\$" /etc/hosts 2>/dev/null; then
		grep -v "$HOSTS_MARK\$" /etc/hosts >"/tmp/jobgate-e2e-hosts.$$" || true
		cat "/tmp/jobgate-e2e-hosts.$$" >/etc/hosts
		rm -f "/tmp/jobgate-e2e-hosts.$$"
	fi
	if [ $code -ne 0 ] && [ -n "${WORK:-}" ]; then
		for f in "$WORK/hub.log" "$WORK/relay.log" "$HOME_DIR"/jupyterhub_slurmspawner_*.log; do
			[ -f "$f" ] && { echo "--- $f (last 40 lines)" >&2; tail -n 40 "$f" >&2; }
		done
	fi
	cleanup_common
	if [ $code -eq 0 ]; then
		echo "jupyterhub: PASS in $(since "$T0") s"
	else
		echo "jupyterhub: FAIL (exit $code) after $(since "$T0") s"
	fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and runs the job as $E2E_USER)"
scontrol ping 2>/dev/null | grep -q 'is UP' || die "Slurm is not running: run tests/e2e/slurm-setup.sh first"
t=$(now_ms)
ensure_base_tools
apt_install chromium
ensure_venv
ensure_hub
ensure_node_modules
ensure_user
log "setup done in $(since "$t") s"
HOME_DIR=$(getent passwd "$E2E_USER" | cut -d: -f6)
SPAWNER_PKG=$REPO_ROOT/contrib/jupyterhub

# --- the URL check, alone --------------------------------------------------------------
PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$SPAWNER_PKG "$VENV/bin/python" - <<'PY' || die "session_url accepts or refuses the wrong URLs"
from jobgate_spawner import session_url as s
d = "jobgate.test"
assert s("https://ab1-c.jobgate.test/", d) == "https://ab1-c.jobgate.test"
assert s("https://ab1.jobgate.test:4443/", d, 4443) == "https://ab1.jobgate.test:4443"
for bad in ["https://evil.test/", "https://a.b.jobgate.test/", "http://a.jobgate.test/",
            "https://a.jobgate.test:1/", "https://a.jobgate.test/x", "https://a.jobgate.test/?k=v",
            "https://a.jobgate.test.evil/", "https://-a.jobgate.test/", "https://a@b.jobgate.test/",
            "https://A.jobgate.test/", None, 7]:
    assert s(bad, d, 4443 if ":" in str(bad)[8:] else 0) is None, bad
PY
log "the spawner accepts only https://<name>.<domain>[:port] URLs"

make_workdir
RELAY_EXTRA_ARGS=(--allow-public)
start_relay
install -d -m 755 "$WORK/hub"
cp -r "$SPAWNER_PKG" "$WORK/spawner" && chmod -R a+rX "$WORK/spawner"
install -d -m 700 -o "$E2E_USER" -g "$E2E_USER" "$UWORK/notebooks"

# Session names -> loopback, for the hub and CHP (Chromium talks to the hub only).
(
	while :; do
		for f in "$HOME_DIR"/.jobgate/jobs/*.json; do
			host=$(sed -n 's#^ *"url": *"https://\([a-z0-9-]*\.'"$E2E_DOMAIN"'\)[:/].*#\1#p' "$f" 2>/dev/null || true)
			if [ -n "$host" ] && ! grep -q " $host $HOSTS_MARK\$" /etc/hosts; then
				echo "127.0.0.1 $host $HOSTS_MARK" >>/etc/hosts
			fi
		done
		sleep 0.2
	done
) &
WATCH_PID=$!

HUB_PORT=$(free_port tcp)
HUB_API_PORT=$(free_port tcp)
PROXY_API_PORT=$(free_port tcp)
HUB_URL=http://127.0.0.1:$HUB_PORT
PASSWORD=e2e-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
export CONFIGPROXY_AUTH_TOKEN
CONFIGPROXY_AUTH_TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
cat >"$WORK/hub/jupyterhub_config.py" <<PY
c = get_config()  # noqa
c.JupyterHub.bind_url = "$HUB_URL"
c.JupyterHub.public_url = "$HUB_URL"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:$HUB_API_PORT"
c.JupyterHub.db_url = "sqlite:///$WORK/hub/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "$WORK/hub/cookie_secret"
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = "$PASSWORD"
c.Authenticator.allowed_users = {"$E2E_USER"}
c.JupyterHub.spawner_class = "jobgate_spawner.JobgateSlurmSpawner"
# CHP rewrites Host (and so SNI) to the target's: the relay routes by it.
c.ConfigurableHTTPProxy.command = ["$CHP_PREFIX/node_modules/.bin/configurable-http-proxy", "--change-origin"]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:$PROXY_API_PORT"
c.JobgateSlurmSpawner.jobgate_domain = "$E2E_DOMAIN"
c.JobgateSlurmSpawner.jobgate_port = $HTTPS_PORT
# The hub runs as root here; sites use the default sudo -E -u {username}.
c.JobgateSlurmSpawner.exec_prefix = "setpriv --reuid={username} --regid={username} --init-groups"
# What a site does with module load: jobgate and jupyterhub-singleuser on PATH.
c.JobgateSlurmSpawner.req_prologue = "export PATH=$WORK/bin:$VENV/bin:/usr/local/bin:/usr/bin:/bin"
c.JobgateSlurmSpawner.req_nprocs = "1"
c.JobgateSlurmSpawner.req_runtime = "00:30:00"
c.Spawner.environment = {
    "JOBGATE_RELAY": "127.0.0.1:$QUIC_PORT",
    "JOBGATE_RELAY_CA": "$CA",
    "JOBGATE_TOKEN_FILE": "$UWORK/token",
}
# Requests reach the server with Host = the relay's name and Origin = the hub's.
c.Spawner.args = ["--ServerApp.allow_origin=$HUB_URL"]
c.Spawner.hub_connect_url = "http://127.0.0.1:$HUB_API_PORT"
c.Spawner.default_url = "/lab"
c.Spawner.notebook_dir = "$UWORK/notebooks"
c.Spawner.start_timeout = 240
c.Spawner.http_timeout = 120
PY

t=$(now_ms)
(cd "$WORK/hub" && exec env PYTHONPATH="$WORK/spawner" PATH="$WORK/bin:$VENV/bin:/usr/local/bin:/usr/bin:/bin" \
	SSL_CERT_FILE="$CA" NODE_EXTRA_CA_CERTS="$CA" \
	"$VENV/bin/jupyterhub" -f "$WORK/hub/jupyterhub_config.py") >"$WORK/hub.log" 2>&1 &
HUB_PID=$!
for _ in $(seq 600); do
	curl -sf -o /dev/null "$HUB_URL/hub/api" && break
	kill -0 "$HUB_PID" 2>/dev/null || die "the hub exited"
	sleep 0.1
done
curl -sf -o /dev/null "$HUB_URL/hub/api" || die "the hub did not come up within 60 s"
log "hub up at $HUB_URL in $(since "$t") s"

routes() { curl -sS -H "Authorization: token $CONFIGPROXY_AUTH_TOKEN" "http://127.0.0.1:$PROXY_API_PORT/api/routes"; }

JG_HUB_URL=$HUB_URL JG_USER=$E2E_USER JG_PASSWORD=$PASSWORD JG_NODE_PREFIX=$NODE_PREFIX \
	JG_SCREENSHOT=$ARTIFACTS/jupyterhub-notebook.png node "$E2E_DIR/jupyterhub-browser.mjs" &
BROWSER_PID=$!

# While the browser works: the route the hub gave CHP points at the relay.
TARGET=
for _ in $(seq 2400); do
	TARGET=$(routes 2>/dev/null | "$VENV/bin/python" -c '
import json, sys
routes = json.load(sys.stdin)
print(routes.get("/user/'"$E2E_USER"'", {}).get("target", ""))' 2>/dev/null || true)
	[ -n "$TARGET" ] && break
	kill -0 "$BROWSER_PID" 2>/dev/null || break
	sleep 0.1
done
case $TARGET in
https://*."$E2E_DOMAIN:$HTTPS_PORT") log "CHP routes /user/$E2E_USER to $TARGET (the relay)" ;;
*) die "CHP's route for /user/$E2E_USER is '$TARGET', want https://<name>.$E2E_DOMAIN:$HTTPS_PORT" ;;
esac
# Nothing of the job listens beyond loopback: the hub never connects to the node. (srun's
# own step I/O port is Slurm's, present for any job step.)
if command -v ss >/dev/null; then
	listeners=0
	for pid in $(pgrep -u "$E2E_USER" || true); do
		mine=$(ss -Hltnp 2>/dev/null | grep "pid=$pid," | grep -v '(("srun",' || true)
		[ -n "$mine" ] && listeners=$((listeners + $(wc -l <<<"$mine")))
		wide=$(awk '$4 !~ /^(127\.0\.0\.1|\[::1\]):/' <<<"$mine")
		[ -z "$wide" ] || die "process $pid of the job listens beyond loopback: $wide"
	done
	[ "$listeners" -ge 1 ] || die "found no listener of the job (the single-user server's)"
	log "the job's $listeners TCP listeners are on loopback only"
fi
# A direct visit to the relay URL, without the hub's login, does not reach the server.
code=$(status_of "$TARGET/user/$E2E_USER/api/contents")
case $code in 302 | 401 | 403) log "the relay URL without hub login answers $code" ;; *) die "the relay URL without hub login answered $code" ;; esac
loc=$(relay_curl -o /dev/null -w '%{http_code} %{redirect_url}' "$TARGET/user/$E2E_USER/lab")
case $loc in
"302 $HUB_URL/hub/api/oauth2/authorize?"*) log "a page on the relay URL without hub login redirects to the hub's OAuth" ;;
*) die "a page on the relay URL without hub login answered '$loc', want a redirect to $HUB_URL/hub/api/oauth2/authorize" ;;
esac
code=$(status_of "$TARGET/user/$E2E_USER/api")
[ "$code" = 200 ] || die "the server's /api (what the hub polls) answered $code through the relay"

wait "$BROWSER_PID" || die "the browser run failed"
log "browser: logged in, spawned, ran a cell (42), stopped the server"

gone=
t=$(now_ms)
for _ in $(seq 200); do
	if [ "$(status_of "$TARGET/user/$E2E_USER/api")" = 404 ]; then
		gone=$(since "$t")
		break
	fi
	sleep 0.1
done
[ -n "$gone" ] || die "the jobgate URL did not answer 404 after the stop (it answers $(status_of "$TARGET/user/$E2E_USER/api"))"
log "the jobgate URL answers 404 after the stop"
left=$(routes | "$VENV/bin/python" -c 'import json,sys; print("/user/'"$E2E_USER"'" in json.load(sys.stdin))')
[ "$left" = False ] || die "CHP still routes /user/$E2E_USER after the stop"
[ -z "$(squeue -h -u "$E2E_USER" -n spawner-jupyterhub -o %i)" ] || die "the job still runs after the stop"
log "route removed, job gone"
