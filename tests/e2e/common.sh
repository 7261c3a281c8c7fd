# shellcheck shell=bash
# Shared by the end-to-end scripts in this directory (sourced, not run).
#
# Installs what the tests need, idempotently, from Debian, PyPI and npm only (no browser
# download), makes the unprivileged user the job side runs as (Jupyter refuses root; a
# real cluster runs jobs as users too), and starts a relay on loopback with a throw-away CA.
#
# Knobs (environment):
#   JOBGATE_BIN   the jobgate binary            [target/debug/jobgate in the repo]
#   E2E_HOME      where the venv and node_modules live, kept between runs [/opt/jobgate-e2e]
#   E2E_USER      the unprivileged user the job side runs as [jgtest]
#   E2E_KEEP=1    keep the work directory (logs, config) after the run

set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$E2E_DIR/../.." && pwd)
JOBGATE_BIN=${JOBGATE_BIN:-$REPO_ROOT/target/debug/jobgate}
case $JOBGATE_BIN in /*) ;; *) JOBGATE_BIN=$REPO_ROOT/$JOBGATE_BIN ;; esac
E2E_HOME=${E2E_HOME:-/opt/jobgate-e2e}
E2E_USER=${E2E_USER:-jgtest}
E2E_DOMAIN=${E2E_DOMAIN:-jobgate.test}
ARTIFACTS=${ARTIFACTS:-$REPO_ROOT/target/e2e}
VENV=$E2E_HOME/venv
NODE_PREFIX=$E2E_HOME/node
# The path the job side sees: the venv's jupyter, the copied jobgate, the system.
JOB_PATH=/usr/local/bin:/usr/bin:/bin

now_ms() { echo $(($(date +%s%N) / 1000000)); }
# Seconds since $1 (a `now_ms` stamp), one decimal.
since() {
	local d=$(($(now_ms) - $1))
	printf '%d.%d' $((d / 1000)) $(((d % 1000) / 100))
}
T0=${T0:-$(now_ms)}
log() { printf '[%6ss] %s\n' "$(since "$T0")" "$*" >&2; }
die() {
	log "FAIL: $*"
	exit 1
}

# --- installs ------------------------------------------------------------------------

APT_UPDATED=
apt_install() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	local t
	t=$(now_ms)
	if [ -z "$APT_UPDATED" ]; then
		log "apt-get update"
		apt-get update -qq >/dev/null
		APT_UPDATED=1
	fi
	log "apt-get install ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" 2>&1 >/dev/null | grep -v "^debconf: delaying" >&2 || true
	for p in "${missing[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || die "apt-get could not install $p"
	done
	log "installed ${missing[*]} in $(since "$t") s"
}

# Tools every script uses.
ensure_base_tools() {
	apt_install curl ca-certificates openssl procps util-linux passwd
}

# JupyterLab >= 4 in a venv made from Debian's python (usable by any user, unlike a
# python under root's home), readable by everyone.
ensure_venv() {
	if [ -x "$VENV/bin/jupyter-lab" ] && "$VENV/bin/python" -c '
import sys
from importlib.metadata import version
sys.exit(0 if int(version("jupyterlab").split(".")[0]) >= 4 and version("jupyter_server") else 1)' 2>/dev/null; then
		return 0
	fi
	apt_install python3 python3-venv
	local t
	t=$(now_ms)
	log "creating $VENV with jupyterlab>=4 (PyPI)"
	mkdir -p "$E2E_HOME"
	chmod 755 "$E2E_HOME"
	rm -rf "$VENV"
	(umask 022 && /usr/bin/python3 -m venv "$VENV" &&
		"$VENV/bin/pip" install -q --disable-pip-version-check --no-cache-dir 'jupyterlab>=4,<5' >/dev/null)
	log "venv ready in $(since "$t") s"
}

# playwright-core (no browser download: we drive Debian's chromium).
ensure_node_modules() {
	local want
	want=$(sed -n 's/.*"playwright-core": *"\([^"]*\)".*/\1/p' "$E2E_DIR/package.json")
	if [ -f "$NODE_PREFIX/node_modules/playwright-core/package.json" ] &&
		grep -q "\"version\": \"$want\"" "$NODE_PREFIX/node_modules/playwright-core/package.json"; then
		return 0
	fi
	command -v npm >/dev/null || apt_install nodejs npm
	local t
	t=$(now_ms)
	log "npm install playwright-core@$want"
	mkdir -p "$NODE_PREFIX"
	cp "$E2E_DIR/package.json" "$NODE_PREFIX/"
	[ -f "$E2E_DIR/package-lock.json" ] && cp "$E2E_DIR/package-lock.json" "$NODE_PREFIX/"
	(cd "$NODE_PREFIX" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --loglevel=error >/dev/null)
	log "node modules ready in $(since "$t") s"
}

# JupyterHub, batchspawner (PyPI, pinned, into the shared venv: the job side runs
# jupyterhub-singleuser from it) and configurable-http-proxy (npm, pinned, its own prefix).
HUB_PIP_PINS=('jupyterhub==5.4.4' 'batchspawner==1.3.0')
CHP_VERSION=5.3.0
CHP_PREFIX=$E2E_HOME/chp
ensure_hub() {
	ensure_venv
	if ! "$VENV/bin/python" -c '
import sys
from importlib.metadata import version
have = [name + "==" + version(name) for name in ("jupyterhub", "batchspawner")]
sys.exit(0 if have == sys.argv[1:] else 1)' "${HUB_PIP_PINS[@]}" 2>/dev/null; then
		local t
		t=$(now_ms)
		log "pip install ${HUB_PIP_PINS[*]}"
		(umask 022 && "$VENV/bin/pip" install -q --disable-pip-version-check --no-cache-dir "${HUB_PIP_PINS[@]}" >/dev/null)
		log "jupyterhub ready in $(since "$t") s"
	fi
	if ! grep -qs "\"version\": \"$CHP_VERSION\"" "$CHP_PREFIX/node_modules/configurable-http-proxy/package.json"; then
		command -v npm >/dev/null || apt_install nodejs npm
		local t
		t=$(now_ms)
		log "npm install configurable-http-proxy@$CHP_VERSION"
		mkdir -p "$CHP_PREFIX"
		(umask 022 && cd "$CHP_PREFIX" && npm install --no-audit --no-fund --loglevel=error \
			--prefix "$CHP_PREFIX" "configurable-http-proxy@$CHP_VERSION" >/dev/null)
		log "configurable-http-proxy ready in $(since "$t") s"
	fi
}

ensure_user() {
	id -u "$E2E_USER" >/dev/null 2>&1 || useradd -m -s /bin/bash "$E2E_USER"
}

# Runs a command as the job user: setpriv execs (no extra process), clean environment.
# Extra VAR=value words before the command go into its environment.
as_user() {
	local home
	home=$(getent passwd "$E2E_USER" | cut -d: -f6)
	setpriv --reuid="$E2E_USER" --regid="$E2E_USER" --init-groups \
		env -i HOME="$home" USER="$E2E_USER" LOGNAME="$E2E_USER" PATH="$JOB_PATH" LANG=C.UTF-8 "$@"
}

# --- the work directory and the relay -----------------------------------------------

# $WORK (root's, world-traversable) holds the relay's files and a copy of jobgate the job
# user can run; $UWORK (the job user's, 0700) holds the token file and the job's files.
make_workdir() {
	[ -x "$JOBGATE_BIN" ] || die "no jobgate binary at $JOBGATE_BIN (cargo build, or set JOBGATE_BIN)"
	WORK=$(mktemp -d /tmp/jobgate-e2e.XXXXXX)
	chmod 755 "$WORK"
	mkdir -p "$WORK/bin" "$WORK/relay" "$ARTIFACTS"
	install -m 755 "$JOBGATE_BIN" "$WORK/bin/jobgate"
	UWORK=$WORK/user
	install -d -m 700 -o "$E2E_USER" -g "$E2E_USER" "$UWORK"
	JOB_PATH=$WORK/bin:$VENV/bin:/usr/local/bin:/usr/bin:/bin
	log "work directory $WORK"
}

free_port() {
	/usr/bin/python3 -c 'import socket,sys
s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1]=="udp" else socket.SOCK_STREAM)
s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "$1"
}

RELAY_PID=
# Starts a relay for $E2E_DOMAIN on loopback, issues a token for the job user into
# $UWORK/token (0600, the user's). Sets HTTPS_PORT, QUIC_PORT, CA, RELAY_PID.
# Extra relay flags: the array RELAY_EXTRA_ARGS (e.g. --allow-public).
start_relay() {
	HTTPS_PORT=$(free_port tcp)
	QUIC_PORT=$(free_port udp)
	"$JOBGATE_BIN" dev-cert --domain "$E2E_DOMAIN" --out "$WORK/pki" >/dev/null
	chmod 755 "$WORK/pki"
	chmod 644 "$WORK/pki/ca.pem"
	CA=$WORK/pki/ca.pem
	"$JOBGATE_BIN" token issue --tokens "$WORK/relay/tokens.toml" --user "$E2E_USER" 2>/dev/null >"$WORK/relay/token.tmp"
	install -m 600 -o "$E2E_USER" -g "$E2E_USER" "$WORK/relay/token.tmp" "$UWORK/token"
	rm -f "$WORK/relay/token.tmp"
	"$JOBGATE_BIN" relay --domain "$E2E_DOMAIN" --cert "$WORK/pki/cert.pem" --key "$WORK/pki/key.pem" \
		--tokens "$WORK/relay/tokens.toml" \
		--listen-https "127.0.0.1:$HTTPS_PORT" --listen-quic "127.0.0.1:$QUIC_PORT" \
		${RELAY_EXTRA_ARGS[@]+"${RELAY_EXTRA_ARGS[@]}"} >"$WORK/relay.log" 2>&1 &
	RELAY_PID=$!
	for _ in $(seq 100); do
		curl -s -o /dev/null --cacert "$CA" --connect-to "::127.0.0.1:$HTTPS_PORT" \
			"https://probe.$E2E_DOMAIN:$HTTPS_PORT/" && break
		kill -0 "$RELAY_PID" 2>/dev/null || { cat "$WORK/relay.log" >&2; die "the relay exited"; }
		sleep 0.1
	done
	log "relay up: https 127.0.0.1:$HTTPS_PORT, quic 127.0.0.1:$QUIC_PORT"
}

# curl through the relay: any host name goes to the relay's loopback port, the CA is ours.
relay_curl() {
	curl -sS --cacert "$CA" --connect-to "::127.0.0.1:$HTTPS_PORT" "$@"
}

# Status code of a GET of $1 (no redirects followed).
status_of() {
	relay_curl -o /dev/null -w '%{http_code}' "$1" 2>/dev/null || true
}

# The URL's scheme://host:port/ (no path, no query): what answers "session not found".
session_root() {
	local url=$1
	url=${url%%\?*}
	printf '%s\n' "$(printf '%s' "$url" | sed -E 's#^(https?://[^/]+).*#\1#')/"
}

# Waits up to $2 s for a non-empty file $1; prints its first line.
wait_for_file_line() {
	local file=$1 secs=$2
	for _ in $(seq $((secs * 10))); do
		if [ -s "$file" ]; then
			head -n1 "$file"
			return 0
		fi
		sleep 0.1
	done
	return 1
}

stop_pid() {
	local pid=$1
	[ -n "$pid" ] || return 0
	kill -TERM "$pid" 2>/dev/null || return 0
	for _ in $(seq 100); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
}

cleanup_common() {
	stop_pid "$RELAY_PID"
	if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
		if [ "${E2E_KEEP:-0}" = 1 ]; then
			log "kept $WORK"
		else
			rm -rf "$WORK"
		fi
	fi
}
