#!/usr/bin/env bash
# Builds jobgate with profile-guided optimisation (PGO): a release binary whose code layout
# and inlining follow what a relay and an agent actually run.
#
#   bash packaging/build-pgo.sh              # → target/pgo/jobgate (this machine's glibc)
#   PGO_PORTABLE=1 bash packaging/build-pgo.sh   # also target/portable/jobgate (glibc ≥ 2.17)
#
# Measured on a 2-core VM (docs/performance.md, "Seventh pass"), against the same source
# built without a profile: p50 at one connection 175 vs 234 µs, c50 req/s +14 %, relay +
# agent CPU per request −11 %.
#
# Steps: (1) a release build instrumented to count what runs (`-Cprofile-generate`);
# (2) a training run: the tunnel bench's latency, rps, bulk and WebSocket scenarios in
# quick mode (`cargo bench --bench tunnel`; nginx, wrk and curl from
# benches/install-tools.sh, installed here when run as root), whose relay and agent
# processes write their counts when they exit; (3) the counts merged with `llvm-profdata`
# (rustup component `llvm-tools`); (4) the release build again with `-Cprofile-use`.
# About 15 minutes on 2 cores. The profile fits this source: rerun the script after
# changing the code (a stale profile still builds, it only helps less).
#
# Environment: PGO_DIR (default target/pgo), PGO_PORTABLE=1 (then packaging/build-portable.sh
# with the profile), PGO_SKIP_TOOLS=1 (do not install the load tools).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PGO_DIR=${PGO_DIR:-$repo/target/pgo}
raw=$PGO_DIR/raw
profile=$PGO_DIR/jobgate.profdata
mkdir -p "$PGO_DIR"

# --- llvm-profdata, matching the compiler's LLVM -------------------------------------------
rustup component add llvm-tools >/dev/null 2>&1 || true
profdata=$(find "$(rustc --print sysroot)/lib/rustlib" -name llvm-profdata -type f | head -n 1)
if [ -z "$profdata" ]; then
	echo "[pgo] FAIL: no llvm-profdata (rustup component add llvm-tools)" >&2
	exit 1
fi

# --- 1. instrumented build ------------------------------------------------------------------
echo "[pgo] 1/4 instrumented release build"
# `--target` names the host explicitly so that RUSTFLAGS reach only jobgate's own code, not
# the build scripts and proc-macros (which would run instrumented and add their counts).
host=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-Cprofile-generate=$raw" \
	cargo build --release --locked --bin jobgate --target "$host" --target-dir "$repo/target/pgo-generate"
instrumented=$repo/target/pgo-generate/$host/release/jobgate
rm -rf "$raw"
mkdir -p "$raw"

# --- 2. training run ------------------------------------------------------------------------
if [ "${PGO_SKIP_TOOLS:-0}" != 1 ] && [ "$(id -u)" -eq 0 ] && ! command -v wrk >/dev/null; then
	echo "[pgo] installing the bench's load tools (benches/install-tools.sh)"
	sh benches/install-tools.sh >/dev/null
fi
for tool in nginx wrk curl; do
	if ! command -v "$tool" >/dev/null && [ ! -x "/usr/sbin/$tool" ]; then
		echo "[pgo] FAIL: $tool is missing (benches/install-tools.sh installs it)" >&2
		exit 1
	fi
done
echo "[pgo] 2/4 training run: the tunnel bench, quick, with the instrumented binary"
# The bench process itself needs no speed here: a quick build of it. The harness asks each
# relay and agent to exit (SIGTERM) rather than killing it when LLVM_PROFILE_FILE is set,
# so each writes its counts.
LLVM_PROFILE_FILE="$raw/jobgate-%p-%m.profraw" \
	JOBGATE_BENCH_BIN="$instrumented" JOBGATE_BENCH_ONLY=latency,rps,bulk,ws \
	JOBGATE_BENCH_QUICK=1 JOBGATE_BENCH_HOP=0 JOBGATE_BENCH_WITHOUT=rathole \
	CARGO_PROFILE_BENCH_LTO=false CARGO_PROFILE_BENCH_CODEGEN_UNITS=16 \
	cargo bench --locked --bench tunnel --target-dir "$repo/target/pgo-train" >"$PGO_DIR/training.log" 2>&1 || {
	echo "[pgo] FAIL: the training run failed; its log:" >&2
	tail -n 40 "$PGO_DIR/training.log" >&2
	exit 1
}
count=$(find "$raw" -name '*.profraw' | wc -l)
echo "[pgo] $count processes wrote counts"
if [ "$count" -lt 4 ]; then
	echo "[pgo] FAIL: expected counts from the relays and agents of every scenario" >&2
	exit 1
fi

# --- 3. merge -------------------------------------------------------------------------------
echo "[pgo] 3/4 merging into $profile"
"$profdata" merge -o "$profile" "$raw"

# --- 4. optimised build ---------------------------------------------------------------------
echo "[pgo] 4/4 release build with the profile"
RUSTFLAGS="-Cprofile-use=$profile" \
	cargo build --release --locked --bin jobgate --target "$host" --target-dir "$repo/target/pgo-build"
cp "$repo/target/pgo-build/$host/release/jobgate" "$PGO_DIR/jobgate"
"$PGO_DIR/jobgate" --version
echo "[pgo] OK: $PGO_DIR/jobgate"

if [ "${PGO_PORTABLE:-0}" = 1 ]; then
	PORTABLE_PGO_PROFILE="$profile" bash packaging/build-portable.sh
fi
