#!/usr/bin/env bash
# All end-to-end tests, in order: the browser tests (JupyterLab; two sessions attacking
# each other), then the Slurm tests and the portal tests (Open OnDemand app, JupyterHub) on
# that Slurm (Slurm is started
# first and stopped after; E2E_SLURM_KEEP=1 leaves it running), then the network fault
# tests (netns.sh: namespaces, delay, loss, link cuts, relay kill and drain; fallback.sh:
# UDP dropped by nftables, only an HTTP proxy out, back to QUIC). Each prints PASS or FAIL
# and its seconds; the exit status is non-zero if any failed. Full logs go to
# target/e2e/<test>.log, the notebook screenshot to target/e2e/jupyter-notebook.png.
#
# Needs root and the jobgate binary ($JOBGATE_BIN, default target/debug/jobgate).
# First run on a fresh machine installs chromium, slurm-wlm, munge (apt), jupyterlab
# (PyPI, in /opt/jobgate-e2e/venv), playwright-core and oidc-provider (npm), ruby (apt),
# jupyterhub and batchspawner (PyPI, same venv), configurable-http-proxy (npm,
# /opt/jobgate-e2e/chp): a few minutes.

set -uo pipefail
E2E_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$E2E_DIR/../.." && pwd)
ARTIFACTS=${ARTIFACTS:-$REPO_ROOT/target/e2e}
export ARTIFACTS
mkdir -p "$ARTIFACTS"

passed=0
failed=0
now_ms() { echo $(($(date +%s%N) / 1000000)); }
seconds() {
	local d=$(($(now_ms) - $1))
	printf '%d.%d' $((d / 1000)) $(((d % 1000) / 100))
}

# run NAME COMMAND...: output to $ARTIFACTS/NAME.log, our own progress lines echoed
# (Jupyter's log lines stay in the file), the log's end shown on failure.
run() {
	local name=$1 t code
	shift
	t=$(now_ms)
	echo "=== $name"
	# The filter's own status must not mask the test's: with pipefail, `pipeline || true`
	# would reset PIPESTATUS to the `true`'s and report a failed test as passed.
	"$@" 2>&1 | tee "$ARTIFACTS/$name.log" | { grep --line-buffered -vE '^\[[DIWEC] [0-9]{4}-|^    ' || true; }
	code=${PIPESTATUS[0]}
	if [ "$code" = 0 ]; then
		echo "=== $name: PASS ($(seconds "$t") s)"
		return 0
	fi
	echo "=== $name: FAIL, exit $code ($(seconds "$t") s); last lines of $ARTIFACTS/$name.log:"
	tail -n 60 "$ARTIFACTS/$name.log"
	return 1
}

tally() {
	if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}

T0=$(now_ms)
tally run jupyter-browser bash "$E2E_DIR/jupyter-browser.sh"
# Two sessions in one browser: the other session's page must not act in the victim's (~10 s).
tally run cross-session-browser bash "$E2E_DIR/cross-session-browser.sh"
# Owner-only sessions through single sign-on (a real oidc-provider), and `jobgate login` (~10 s).
tally run signon-browser bash "$E2E_DIR/signon-browser.sh"

if run slurm-setup bash "$E2E_DIR/slurm-setup.sh" start; then
	tally run slurm-jupyter bash "$E2E_DIR/slurm-jupyter.sh"
	tally run slurm-launch bash "$E2E_DIR/slurm-launch.sh"
	tally run slurm-reserve bash "$E2E_DIR/slurm-reserve.sh"
	# Portals on the same Slurm, one after the other: the OnDemand app (~10 s), JupyterHub
	# with JobgateSlurmSpawner in Chromium (~20 s warm; the first run installs ruby,
	# jupyterhub, batchspawner, configurable-http-proxy).
	tally run ood-app bash "$E2E_DIR/ood-app.sh"
	tally run jupyterhub bash "$E2E_DIR/jupyterhub.sh"
else
	failed=$((failed + 5))
	echo "=== slurm-jupyter, slurm-launch, slurm-reserve, ood-app, jupyterhub: FAIL (Slurm did not start)"
fi
if [ "${E2E_SLURM_KEEP:-0}" != 1 ]; then
	bash "$E2E_DIR/slurm-setup.sh" stop >>"$ARTIFACTS/slurm-setup.log" 2>&1 || true
fi

# Fault tests in network namespaces (delay, loss, link cuts, relay kill/drain): ~2.5 min.
tally run netns bash "$E2E_DIR/netns.sh"
# The TCP transport under real nftables rules: UDP dropped, back to QUIC, proxy only (~20 s).
tally run fallback bash "$E2E_DIR/fallback.sh"

echo "e2e: $passed passed, $failed failed ($(seconds "$T0") s)"
[ "$failed" = 0 ]
