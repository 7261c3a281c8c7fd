#!/bin/bash
# Installs the test OpenID provider (npm oidc-provider, version pinned in package.json)
# into $JOBGATE_OP_HOME [/opt/jobgate-e2e/oidc], idempotently. tests/signon.rs and
# tests/e2e/signon-browser.sh need it; .ci/run calls this before `cargo test`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
home=${JOBGATE_OP_HOME:-/opt/jobgate-e2e/oidc}
want=$(sed -n 's/.*"oidc-provider": *"\([^"]*\)".*/\1/p' "$here/package.json")
if [ -f "$home/node_modules/oidc-provider/package.json" ] &&
	grep -q "\"version\": \"$want\"" "$home/node_modules/oidc-provider/package.json"; then
	exit 0
fi
if ! command -v npm >/dev/null; then
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm >/dev/null
fi
mkdir -p "$home"
cp "$here/package.json" "$home/"
(cd "$home" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
echo "oidc-provider $want installed in $home"
