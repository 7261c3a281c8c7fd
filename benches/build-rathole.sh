#!/bin/sh
# Builds rathole 0.5.0 (the L4 tunnel `cargo bench --bench tunnel` compares jobgate with,
# variant rathole-tls) from the crates registry into ROOT/bin/rathole [target/bench-tools].
# Run by the bench when the binary is missing; nothing of rathole is committed here.
#
# Pinned: rathole =0.5.0 with its own Cargo.lock (`--locked`), except `time`, whose locked
# 0.3.29 no longer compiles with current rustc (type inference change): 0.3.36, the
# smallest release that does. Features: server, client and tls (native-tls: Debian's
# libssl-dev and pkg-config).
set -eu
VERSION=0.5.0
TIME_PIN=0.3.36
ROOT=${1:-$(cd "$(dirname "$0")/.." && pwd)/target/bench-tools}
mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)
CARGO=${CARGO:-cargo}

# 1. The crate, from the registry: a throw-away manifest that depends on it, fetched.
mkdir -p "$ROOT/fetch/src"
cat >"$ROOT/fetch/Cargo.toml" <<EOF
[package]
name = "fetch-rathole"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
rathole = { version = "=$VERSION", default-features = false }
[workspace]
EOF
: >"$ROOT/fetch/src/lib.rs"
"$CARGO" fetch --manifest-path "$ROOT/fetch/Cargo.toml" >/dev/null
CRATE=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/rathole-$VERSION.crate | head -n1)

# 2. Its source, out of our workspace's reach, with the one pin.
rm -rf "$ROOT/rathole-$VERSION"
tar -xzf "$CRATE" -C "$ROOT"
printf '\n[workspace]\n' >>"$ROOT/rathole-$VERSION/Cargo.toml"
"$CARGO" update --manifest-path "$ROOT/rathole-$VERSION/Cargo.toml" -p time --precise "$TIME_PIN" >/dev/null 2>&1

# 3. The build.
"$CARGO" build --release --locked --manifest-path "$ROOT/rathole-$VERSION/Cargo.toml" \
	--target-dir "$ROOT/rathole-target" --no-default-features --features server,client,tls
mkdir -p "$ROOT/bin"
cp "$ROOT/rathole-target/release/rathole" "$ROOT/bin/rathole"
"$ROOT/bin/rathole" --version
