#!/usr/bin/env bash
# Fuzzes every decoder of jobgate-protocol (protocol/fuzz: frame, request_head,
# response_head, control) with cargo-fuzz / libFuzzer for a bounded time each.
#
# Installs cargo-fuzz if missing. cargo-fuzz needs nightly `-Z` flags: it uses an installed
# nightly toolchain, tries to install one, and otherwise falls back to RUSTC_BOOTSTRAP=1 on
# the stable toolchain. Corpora, crash artifacts and build output live under protocol/fuzz/
# (corpus/, artifacts/, target/), all git-ignored; corpora are kept between runs.
#
# Knobs (environment):
#   FUZZ_SECONDS     seconds per target                        [30]
#   FUZZ_TARGETS     targets to run                            [all four]
#   FUZZ_SANITIZER   address | none (faster; the crate is #![forbid(unsafe_code)]) [address]
#   FUZZ_JOBS        parallel libFuzzer workers per target     [1]
#
# Exit status: 0 if no target found anything, 1 if any did (the crashing inputs are in
# protocol/fuzz/artifacts/<target>/; reproduce with
# `cargo +nightly fuzz run <target> <artifact>` in protocol/fuzz).

set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
FUZZ_DIR=$REPO_ROOT/protocol/fuzz
FUZZ_SECONDS=${FUZZ_SECONDS:-30}
FUZZ_TARGETS=${FUZZ_TARGETS:-frame request_head response_head control}
FUZZ_SANITIZER=${FUZZ_SANITIZER:-address}
FUZZ_JOBS=${FUZZ_JOBS:-1}

log() { printf '[fuzz] %s\n' "$*" >&2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
	log "installing cargo-fuzz (cargo install cargo-fuzz --locked)"
	cargo install cargo-fuzz --locked
fi

toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
	toolchain=(+nightly)
elif rustup toolchain install nightly --profile minimal >/dev/null 2>&1; then
	toolchain=(+nightly)
else
	log "no nightly toolchain: using the default toolchain with RUSTC_BOOTSTRAP=1"
	export RUSTC_BOOTSTRAP=1
fi
log "toolchain: $(rustc "${toolchain[@]}" --version), sanitizer: $FUZZ_SANITIZER"

cd "$FUZZ_DIR"

# A few valid inputs per target so that every run starts inside the formats (libFuzzer
# would find them too, but 30 s is short). Only written into an empty corpus.
seed() {
	local target=$1 name=$2
	shift 2
	mkdir -p "corpus/$target"
	# shellcheck disable=SC2059 # the seed is the format: it holds \x escapes
	printf "$@" >"corpus/$target/seed-$name"
}
seed_corpora() {
	local t
	for t in frame request_head response_head control; do
		if [ -n "$(ls -A "corpus/$t" 2>/dev/null)" ]; then
			continue
		fi
		case $t in
		frame)
			seed frame hello '\x00\x00\x00\x05hello'
			seed frame empty '\x00\x00\x00\x00'
			seed frame partial '\x00\x00\x01\x00abc'
			;;
		request_head)
			# 0x01 "GET" "/x?y=1" v4 127.0.0.1:4000, 1 header host: a.b
			seed request_head get '\x01\x00\x03GET\x00\x00\x00\x06/x?y=1\x04\x7f\x00\x00\x01\x0f\xa0\x00\x01\x00\x04host\x00\x00\x00\x03a.b'
			# 0x01 "OPTIONS" "*" v6 ::1 port 1, 0 headers
			seed request_head star '\x01\x00\x07OPTIONS\x00\x00\x00\x01*\x06\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01\x00\x00'
			;;
		response_head)
			seed response_head ok '\x02\x00\xc8\x00\x02\x00\x0ccontent-type\x00\x00\x00\x09text/html\x00\x0aset-cookie\x00\x00\x00\x03a=1'
			seed response_head switching '\x02\x00\x65\x00\x01\x00\x07upgrade\x00\x00\x00\x09websocket'
			;;
		control)
			seed control hello '{"type":"hello","version":1,"token":"jgt_x","access":"link","job":{"id":"4242","user":"alice","host":"cn017"}}'
			seed control welcome '{"type":"welcome","name":"k3v7abcdefghijkl","url":"https://k3v7abcdefghijkl.example.org/","access_url":"https://k3v7abcdefghijkl.example.org/?jobgate_key=x","limits":{"max_streams":16384,"max_header_bytes":65536}}'
			seed control refused '{"type":"refused","code":"bad_token","message":"no"}'
			seed control bye '{"type":"bye","reason":"app exited"}'
			;;
		esac
	done
}
seed_corpora

started=$(date +%s)
log "building all targets"
cargo "${toolchain[@]}" fuzz build -s "$FUZZ_SANITIZER"
log "built in $(($(date +%s) - started)) s"

failed=()
for target in $FUZZ_TARGETS; do
	args=(-max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
	if [ "$FUZZ_JOBS" -gt 1 ]; then
		args+=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS")
	fi
	if [ -f "$target.dict" ]; then
		args+=(-dict="$target.dict")
	fi
	mkdir -p "corpus/$target"
	t0=$(date +%s)
	log "running $target for ${FUZZ_SECONDS} s"
	if cargo "${toolchain[@]}" fuzz run -s "$FUZZ_SANITIZER" "$target" "corpus/$target" -- "${args[@]}"; then
		log "$target: nothing found in $(($(date +%s) - t0)) s ($(ls "corpus/$target" | wc -l) corpus entries)"
	else
		log "$target: FOUND A FAILURE after $(($(date +%s) - t0)) s; inputs in protocol/fuzz/artifacts/$target/"
		failed+=("$target")
	fi
done

log "done in $(($(date +%s) - started)) s"
if [ ${#failed[@]} -gt 0 ]; then
	log "failing targets: ${failed[*]}"
	exit 1
fi
