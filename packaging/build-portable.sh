#!/usr/bin/env bash
# Builds one jobgate binary that runs on every Linux cluster node of this architecture with
# glibc 2.17 or newer (RHEL/CentOS 7 era and everything since), and checks it.
#
#   bash packaging/build-portable.sh          # → target/portable/jobgate
#
# How: `cargo zigbuild` links against glibc 2.17's symbol versions with zig's linker and C
# compiler (ring builds C and assembly). Both tools come from the Python package registry
# (`ziglang`, `cargo-zigbuild`) into a private venv, so nothing but Python 3 and the Rust
# toolchain already on the machine is needed: no musl target, no old sysroot, no container.
#
# The check: the highest GLIBC_x.y symbol version the binary needs is printed and must be
# ≤ 2.17, and the binary must run `jobgate demo` and serve its page through its own relay.
# Environment: PORTABLE_VENV (default target/portable-venv), PORTABLE_GLIBC (default 2.17),
# PORTABLE_SKIP_DEMO=1 to skip the run check (e.g. when ports 8443/7443 are taken),
# PORTABLE_PGO_PROFILE=path/to/jobgate.profdata to build with a profile
# (packaging/build-pgo.sh makes one and passes it with PGO_PORTABLE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

# Pinned: the versions this script was verified with.
ZIGLANG_VERSION=0.17.1
CARGO_ZIGBUILD_VERSION=0.24.1
GLIBC=${PORTABLE_GLIBC:-2.17}
VENV=${PORTABLE_VENV:-$repo/target/portable-venv}
ARCH=$(uname -m)
TRIPLE="$ARCH-unknown-linux-gnu"
OUT=$repo/target/portable

if [ ! -x "$VENV/bin/cargo-zigbuild" ] || ! "$VENV/bin/python3" -m ziglang version >/dev/null 2>&1; then
	echo "[portable] installing ziglang $ZIGLANG_VERSION and cargo-zigbuild $CARGO_ZIGBUILD_VERSION into $VENV"
	python3 -m venv "$VENV"
	"$VENV/bin/pip" install --quiet --disable-pip-version-check \
		"ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
fi
export PATH="$VENV/bin:$PATH"

if [ -n "${PORTABLE_PGO_PROFILE:-}" ]; then
	echo "[portable] with the profile $PORTABLE_PGO_PROFILE (profile-guided optimisation)"
	export RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PORTABLE_PGO_PROFILE"
fi
echo "[portable] building jobgate for $TRIPLE with glibc $GLIBC symbols (release, stripped)"
# A target dir of its own: the zig-linked artefacts must not mix with the host build's.
CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
	cargo zigbuild --release --locked --bin jobgate \
	--target "$TRIPLE.$GLIBC" --target-dir "$repo/target/portable-build"
mkdir -p "$OUT"
cp "$repo/target/portable-build/$TRIPLE/release/jobgate" "$OUT/jobgate"
bin=$OUT/jobgate
echo "[portable] $bin: $(du -h "$bin" | cut -f1)"

# --- check 1: glibc symbol versions -------------------------------------------------------
if ! readelf -d "$bin" | grep -q NEEDED; then
	echo "[portable] no dynamic section: a static binary"
else
	highest=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1)
	echo "[portable] highest GLIBC_ symbol version needed: $highest (limit $GLIBC)"
	if [ "$(printf '%s\n%s\n' "$highest" "$GLIBC" | sort -V | tail -n 1)" != "$GLIBC" ]; then
		echo "[portable] FAIL: needs glibc $highest > $GLIBC" >&2
		objdump -T "$bin" | grep "GLIBC_$highest" | head >&2
		exit 1
	fi
	echo "[portable] libraries: $(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
fi

# --- check 2: it runs the demo and serves its page ------------------------------------------
if [ "${PORTABLE_SKIP_DEMO:-0}" = 1 ]; then
	echo "[portable] demo check skipped (PORTABLE_SKIP_DEMO=1)"
	exit 0
fi
work=$(mktemp -d)
log=$work/demo.log
"$bin" demo --dir "$work/demo" --https-port 18443 --quic-port 17443 >"$log" 2>&1 &
demo=$!
trap 'kill $demo 2>/dev/null; wait $demo 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 300); do
	grep -q '^  Try:' "$log" && break
	kill -0 $demo 2>/dev/null || break
	sleep 0.1
done
try=$(sed -n 's/^  Try:   //p' "$log")
if [ -z "$try" ]; then
	echo "[portable] FAIL: the demo printed no URL:" >&2
	cat "$log" >&2
	exit 1
fi
if ! body=$(eval "$try --silent --show-error --max-time 10"); then
	echo "[portable] FAIL: '$try' failed" >&2
	cat "$log" >&2
	exit 1
fi
echo "[portable] the demo answered through its relay: $(echo "$body" | head -c 120)"
echo "[portable] OK: $bin"
