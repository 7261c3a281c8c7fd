#!/usr/bin/env bash
# Fault tests with real network plumbing (issue 6): three network namespaces joined by
# veth pairs, routed through the middle one,
#
#   node (agent + demo app)  ── veth ──  dmz (relay, delay forwarder)  ── veth ──  internet (client)
#   10.99.1.2                10.99.1.1 / 10.99.2.1                                  10.99.2.2
#
# node is a firewall-restricted compute node: nftables drops every inbound new connection
# (`ct state established,related accept; policy drop`; loopback allowed) — checked by a TCP
# connect from internet that must fail. The agent dials relay.jobgate.test:7000, which
# resolves (via /etc/netns/<node>/hosts) to udp_delay.py in dmz: 25 ms each way, then the
# relay's QUIC port on dmz's loopback. Loss: `meta l4proto udp numgen random mod 100 < 2
# drop` in node, inbound (inet input) and outbound (netdev egress, which drops silently;
# an output-chain drop would hand the agent EPERM instead of a lost packet).
# NOTE: netfilter here sees quinn's UDP GSO batches (several datagrams, ~9 KB on average)
# as one packet, so "2 %" drops ~2 % of the bytes, in bursts of a few datagrams.
#
# Scenarios, each printing its timings, each PASS/FAIL (the script goes on after a FAIL):
#   firewall   inbound TCP into node fails; node has no non-loopback TCP listener
#   workload   50 ms RTT + 2 % loss: 100 parallel GETs (h2), a WebSocket exchanging 200
#              messages, a download checked byte for byte ($NETNS_DOWNLOAD_MB, default 32;
#              the loss caps QUIC's congestion window: ~0.5 MB/s here, so 100 MB takes
#              ~3 min — NETNS_DOWNLOAD_MB=100 to run it). Delay and loss stay on after.
#   cut10      node's link down 10 s mid-WebSocket and mid-download, default idle
#              timeouts: both complete intact, no reconnect, same URL. The random
#              loss is off during this one (delay stays) and a 2 MB/s policer on
#              node's UDP egress keeps the download congestion-limited across the cut
#              instead: after a cut, quinn's backed-off retransmit timer gives one
#              probe round before a 30 s idle timeout, and a random drop of that probe
#              ends the session (the agent then resumes under its name; see
#              docs/architecture.md), while a policer lets it through after a quiet
#              link. NETNS_CUT10_LOSS=1 keeps the random loss on instead.
#   relaykill  relay SIGKILLed and restarted on the same addresses (now with
#              --idle-timeout 5): both agents come back under their old names
#   longcut    link down longer than the idle timeout (5 s both sides for agent B):
#              503 + Retry-After meanwhile, then the old URLs work again
#   drain      relay SIGTERM (Drain) and restart: agents come back under their old names
#   stop       both jobs end (agent SIGTERM), A mid-download: both URLs answer 404 at once
#
# Run as root. Skips (exit 0) only when network namespaces cannot be made. Installs
# iproute2, nftables, curl, python3 from Debian if missing. Knobs: JOBGATE_BIN,
# NETNS_DOWNLOAD_MB, NETNS_CUT_SECS (10), NETNS_LONG_CUT_SECS (15), NETNS_LOSS_PCT (2),
# NETNS_CUT10_LOSS (1: keep the loss on during cut10),
# NETNS_IDLE_TIMEOUT (--idle-timeout for the first relay and agent A; default: theirs),
# NETNS_SCENARIOS="cut10 longcut" (run only those; firewall always runs),
# E2E_KEEP=1 (keep the work directory with all logs).

# shellcheck source=tests/e2e/common.sh
source "$(dirname "$0")/common.sh"

DOWNLOAD_MB=${NETNS_DOWNLOAD_MB:-32}
CUT_SECS=${NETNS_CUT_SECS:-10}
LONG_CUT_SECS=${NETNS_LONG_CUT_SECS:-15}
LOSS_PCT=${NETNS_LOSS_PCT:-2}
IDLE_ARGS=()
[ -n "${NETNS_IDLE_TIMEOUT:-}" ] && IDLE_ARGS=(--idle-timeout "$NETNS_IDLE_TIMEOUT")
PY=/usr/bin/python3
CLIENT=$E2E_DIR/netns_client.py
FORWARDER=$E2E_DIR/udp_delay.py

P=jg$$
NS_NODE=$P-node
NS_DMZ=$P-dmz
NS_INET=$P-inet
V_NODE=${P}n0 # node's end of node<->dmz
V_DMZ_N=${P}d0
V_INET=${P}i0
V_DMZ_I=${P}d1
NODE_IP=10.99.1.2
DMZ_NODE_IP=10.99.1.1
DMZ_INET_IP=10.99.2.1
INET_IP=10.99.2.2
HTTPS_PORT=8443
FWD_PORT=7000
RELAY_NAME=relay.$E2E_DOMAIN

PIDS=()
RESULTS=()
FAILED=0
NAMESPACES_MADE=0
RELAY_PID=
RELAY_N=0

cleanup() {
	local code=$? pid ns
	trap - EXIT
	for pid in "${PIDS[@]}"; do
		disown "$pid" 2>/dev/null || true
		kill -TERM "$pid" 2>/dev/null || true
	done
	for _ in $(seq 30); do # a draining relay takes ~1.3 s
		alive=0
		for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
		[ $alive = 0 ] && break
		sleep 0.1
	done
	for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
	if [ "$NAMESPACES_MADE" = 1 ]; then
		for ns in "$NS_NODE" "$NS_DMZ" "$NS_INET"; do
			# Whatever still runs in our namespaces was started by this script.
			for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
			ip netns del "$ns" 2>/dev/null || true
			rm -rf "/etc/netns/$ns"
		done
	fi
	if [ $code -ne 0 ] && [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
		for f in "$WORK"/relay.*.log "$WORK"/agent.*.log; do
			[ -f "$f" ] && { echo "--- $f (last 25 lines)" >&2; tail -n 25 "$f" | sed 's/\x1b\[[0-9;]*m//g' >&2; }
		done
	fi
	if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
		if [ "${E2E_KEEP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
	fi
	if [ $code -eq 0 ]; then
		echo "netns: PASS in $(since "$T0") s"
	else
		echo "netns: FAIL (exit $code) after $(since "$T0") s"
	fi
	exit $code
}
trap cleanup EXIT

# --- can we? ----------------------------------------------------------------------------

if ! command -v ip >/dev/null; then
	[ "$(id -u)" = 0 ] && apt_install iproute2
fi
if ! command -v ip >/dev/null || ! ip netns add "$P-probe" 2>/dev/null; then
	echo "netns: SKIP: cannot create network namespaces here (needs root and CAP_SYS_ADMIN; uid $(id -u)); the fault tests did not run"
	trap - EXIT
	exit 0
fi
ip netns del "$P-probe"
apt_install iproute2 nftables curl ca-certificates python3

# (Background processes are started with `ip netns exec` itself, not nsx, so that $! is
# the process: ip execs the command.)
nsx() { # nsx node|dmz|inet COMMAND...
	local ns
	case $1 in node) ns=$NS_NODE ;; dmz) ns=$NS_DMZ ;; inet) ns=$NS_INET ;; *) die "nsx $1" ;; esac
	shift
	ip netns exec "$ns" "$@"
}

# --- plumbing ---------------------------------------------------------------------------

t=$(now_ms)
NAMESPACES_MADE=1
for ns in "$NS_NODE" "$NS_DMZ" "$NS_INET"; do ip netns add "$ns"; done
ip link add "$V_NODE" type veth peer name "$V_DMZ_N"
ip link set "$V_NODE" netns "$NS_NODE"
ip link set "$V_DMZ_N" netns "$NS_DMZ"
ip link add "$V_INET" type veth peer name "$V_DMZ_I"
ip link set "$V_INET" netns "$NS_INET"
ip link set "$V_DMZ_I" netns "$NS_DMZ"
nsx node ip addr add "$NODE_IP/24" dev "$V_NODE"
nsx dmz ip addr add "$DMZ_NODE_IP/24" dev "$V_DMZ_N"
nsx dmz ip addr add "$DMZ_INET_IP/24" dev "$V_DMZ_I"
nsx inet ip addr add "$INET_IP/24" dev "$V_INET"
for pair in "node $V_NODE" "dmz $V_DMZ_N" "dmz $V_DMZ_I" "inet $V_INET" "node lo" "dmz lo" "inet lo"; do
	read -r ns dev <<<"$pair"
	nsx "$ns" ip link set "$dev" up
done
nsx node ip route add default via "$DMZ_NODE_IP"
nsx inet ip route add default via "$DMZ_INET_IP"
nsx dmz sysctl -qw net.ipv4.ip_forward=1
# `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts: the relay's name
# resolves, inside node only, to the delay forwarder.
mkdir -p "/etc/netns/$NS_NODE"
printf '127.0.0.1 localhost\n%s %s\n' "$DMZ_NODE_IP" "$RELAY_NAME" >"/etc/netns/$NS_NODE/hosts"
log "namespaces $NS_NODE, $NS_DMZ, $NS_INET up in $(since "$t") s"

tcp_probe() { # tcp_probe NS HOST PORT -> "ok" or the error, within 2 s
	nsx "$1" "$PY" -c '
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close(); print("ok")
except Exception as e:
    print(type(e).__name__)' "$2" "$3"
}

firewall_on() {
	nsx node nft -f - <<-EOF
		table inet jgfw {
			chain input {
				type filter hook input priority 0; policy drop;
				iif lo accept
				ct state established,related accept
			}
		}
	EOF
}
loss_on() {
	[ "$LOSS_PCT" -gt 0 ] || return 0
	nsx node nft -f - <<-EOF
		table inet jgloss {
			chain input {
				type filter hook input priority -10;
				iif != lo meta l4proto udp numgen random mod 100 < $LOSS_PCT counter drop
			}
		}
		table netdev jgloss {
			chain egress {
				type filter hook egress device "$V_NODE" priority -10;
				meta l4proto udp numgen random mod 100 < $LOSS_PCT counter drop
			}
		}
	EOF
}
loss_off() {
	[ "$LOSS_PCT" -gt 0 ] || return 0
	nsx node nft delete table inet jgloss && nsx node nft delete table netdev jgloss
}
police_on() { # node -> relay UDP over 2 MB/s dropped: a bottleneck that drops only when full
	nsx node nft -f - <<-EOF
		table netdev jgpolice {
			chain egress {
				type filter hook egress device "$V_NODE" priority -10;
				meta l4proto udp limit rate over 2 mbytes/second burst 256 kbytes counter drop
			}
		}
	EOF
}
police_off() { nsx node nft delete table netdev jgpolice; }
loss_counters() {
	nsx node nft list ruleset 2>/dev/null | sed -n 's/.*counter packets \([0-9]*\) bytes \([0-9]*\) drop.*/\1 pkts (\2 B)/p' | paste -sd/ - || true
}
CUT_AT=0 CUT_AT_EPOCH=0 CUT_WALL=
cut_on() { # everything in and out of node's veth dropped, silently (no errors to senders)
	nsx node nft -f - <<-EOF
		table inet jgcut {
			chain input { type filter hook input priority -20; iif != lo drop; }
		}
		table netdev jgcut {
			chain egress { type filter hook egress device "$V_NODE" priority -20; drop; }
		}
	EOF
	CUT_AT=$(now_ms)
	CUT_AT_EPOCH=$(($(date +%s%N) / 1000000))
	CUT_WALL=$(date -u +%Y-%m-%dT%H:%M:%S.%6NZ)
}
cut_off() {
	nsx node nft delete table inet jgcut
	nsx node nft delete table netdev jgcut
}

# --- the jobgate side -------------------------------------------------------------------

WORK=$(mktemp -d /tmp/jobgate-netns.XXXXXX)
chmod 755 "$WORK"
[ -x "$JOBGATE_BIN" ] || die "no jobgate binary at $JOBGATE_BIN (cargo build, or set JOBGATE_BIN)"
install -m 755 "$JOBGATE_BIN" "$WORK/jobgate"
J=$WORK/jobgate
"$J" dev-cert --domain "$E2E_DOMAIN" --out "$WORK/pki" >/dev/null
CA=$WORK/pki/ca.pem
mkdir -p "$WORK/relay"
(umask 077 && "$J" token issue --tokens "$WORK/relay/tokens.toml" --user alice 2>/dev/null >"$WORK/token")
[ -s "$WORK/token" ] || die "token issue printed no token"

RELAY_ARGS=(--domain "$E2E_DOMAIN" --cert "$WORK/pki/cert.pem" --key "$WORK/pki/key.pem"
	--tokens "$WORK/relay/tokens.toml" --listen-https "$DMZ_INET_IP:$HTTPS_PORT" --listen-quic "127.0.0.1:7443")

# curl from the internet namespace; every session name goes to the relay's address.
icurl() {
	nsx inet curl -sS --cacert "$CA" --connect-to "::$DMZ_INET_IP:$HTTPS_PORT" "$@"
}

start_relay() { # start_relay [EXTRA ARGS...]
	RELAY_N=$((RELAY_N + 1))
	ip netns exec "$NS_DMZ" "$J" relay "${RELAY_ARGS[@]}" "$@" >"$WORK/relay.$RELAY_N.log" 2>&1 &
	RELAY_PID=$!
	PIDS+=("$RELAY_PID")
	for _ in $(seq 100); do
		icurl -o /dev/null "https://probe.$E2E_DOMAIN:$HTTPS_PORT/" 2>/dev/null && return 0
		kill -0 "$RELAY_PID" 2>/dev/null || { cat "$WORK/relay.$RELAY_N.log" >&2; die "the relay exited"; }
		sleep 0.1
	done
	die "the relay did not answer within 10 s"
}

# start_agent LABEL [AGENT ARGS...]: sets URL_<LABEL>, HOST_<LABEL>, KEY_<LABEL>, APID_<LABEL>.
start_agent() {
	local label=$1 url pid
	shift
	ip netns exec "$NS_NODE" "$J" agent --relay "$RELAY_NAME:$FWD_PORT" --relay-ca "$CA" --token-file "$WORK/token" \
		--url-file "$WORK/url.$label" "$@" -- "$J" demo-app --listen '127.0.0.1:{port}' --label "$label" \
		>"$WORK/agent.$label.log" 2>&1 &
	pid=$!
	PIDS+=("$pid")
	url=$(wait_for_file_line "$WORK/url.$label" 30) || { cat "$WORK/agent.$label.log" >&2; die "agent $label printed no URL"; }
	printf -v "URL_$label" '%s' "$url"
	printf -v "HOST_$label" '%s' "$(printf '%s' "$url" | sed -E 's#^https://([^:/]+).*#\1#')"
	printf -v "KEY_$label" '%s' "${url##*jobgate_key=}"
	printf -v "APID_$label" '%s' "$pid"
}

# u LABEL PATH -> the session URL of agent LABEL for PATH (with the key in place)
u() {
	local host key sep='?'
	host=HOST_$1 key=KEY_$1
	case $2 in *\?*) sep='&' ;; esac
	printf 'https://%s:%s%s%sjobgate_key=%s' "${!host}" "$HTTPS_PORT" "$2" "$sep" "${!key}"
}

# label_of LABEL -> "<status> <x-app-label>" of a GET /echo on agent LABEL's URL
label_of() {
	icurl --max-time 5 -o /dev/null -w '%{http_code} %header{x-app-label}' "$(u "$1" /echo)" 2>/dev/null || true
}

# agent_lines LABEL FROM_LINE -> the agent's log lines after line FROM_LINE
agent_lines() { tail -n +"$(($2 + 1))" "$WORK/agent.$1.log" | sed 's/\x1b\[[0-9;]*m//g'; }
agent_mark() { wc -l <"$WORK/agent.$1.log"; }

# tally "a a b b b" -> "a x2, b x3" (runs of equal words)
tally_runs() { printf '%s' "$1" | tr -s ' ' '\n' | uniq -c | awk '{printf "%s%s x%s", (NR>1?", ":""), $2, $1}'; }

# after_cut LOGFILE REGEX -> seconds from the last cut_on to the first matching log line's
# timestamp (the relay's and agent's tracing lines start with an RFC 3339 UTC time)
after_cut() {
	local ts ms
	ts=$(sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -E "$2" | awk -v since="$CUT_WALL" '{ if ($1 >= since) { print $1; exit } }')
	[ -n "$ts" ] || { echo "?"; return; }
	ms=$(($(date -d "$ts" +%s%N) / 1000000 - CUT_AT_EPOCH))
	secs "$ms"
}

secs() { # secs MS -> "S.s"
	printf '%d.%d' $(($1 / 1000)) $((($1 % 1000) / 100))
}

scenario() { # scenario NAME FUNCTION: runs it, records PASS/FAIL and its time
	local name=$1 t result
	case " ${NETNS_SCENARIOS:-$name} " in *" $name "*) ;; *) log "(skipping $name)"; return 0 ;; esac
	t=$(now_ms)
	log "=== scenario $name"
	if "$2"; then result=PASS; else result=FAIL; FAILED=$((FAILED + 1)); fi
	RESULTS+=("$(printf '%-10s %s  %6s s' "$name" "$result" "$(since "$t")")")
	log "=== scenario $name: $result ($(since "$t") s)"
}
bad() { log "FAIL: $*"; return 1; }

# --- the delay forwarder, the relay, the first agent ------------------------------------

ip netns exec "$NS_DMZ" "$PY" "$FORWARDER" --listen "$DMZ_NODE_IP:$FWD_PORT" --upstream 127.0.0.1:7443 --delay-ms 25 --stats 0.5 >"$WORK/fwd.log" 2>&1 &
PIDS+=("$!")
FWD_PID=$!

# --- scenario: firewall -------------------------------------------------------------------

sc_firewall() {
	local before after listener
	ip netns exec "$NS_NODE" "$PY" -c '
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000)); s.listen(); s.settimeout(30)
while True:
    try: s.accept()[0].close()
    except OSError: break' &
	listener=$!
	sleep 0.3
	before=$(tcp_probe inet "$NODE_IP" 9000)
	firewall_on || { kill "$listener"; bad "nft in node failed"; return 1; }
	after=$(tcp_probe inet "$NODE_IP" 9000)
	kill -KILL "$listener" 2>/dev/null; wait "$listener" 2>/dev/null
	log "TCP connect internet -> node:9000: before the firewall: $before; with it: $after"
	[ "$before" = ok ] || { bad "routing internet -> node does not work ($before): the check would prove nothing"; return 1; }
	[ "$after" != ok ] || { bad "a new inbound TCP connection reached node through the firewall"; return 1; }
	return 0
}
NETNS_SCENARIOS_WANTED=${NETNS_SCENARIOS:-}
unset NETNS_SCENARIOS
scenario firewall sc_firewall || true
[ -n "$NETNS_SCENARIOS_WANTED" ] && NETNS_SCENARIOS=$NETNS_SCENARIOS_WANTED
loss_on || die "nft loss rules failed"
log "loss on: ${LOSS_PCT} % of UDP packets dropped each way in node, from now to the end"
[ "$FAILED" = 0 ] || die "no firewall, no point going on"

start_relay "${IDLE_ARGS[@]}"
log "relay up in $NS_DMZ (https $DMZ_INET_IP:$HTTPS_PORT, quic 127.0.0.1:7443 behind the 25 ms forwarder at $DMZ_NODE_IP:$FWD_PORT)"
t=$(now_ms)
start_agent A "${IDLE_ARGS[@]}"
log "agent A (idle timeout ${NETNS_IDLE_TIMEOUT:-default}) up in $(since "$t") s: $URL_A"
listeners=$(nsx node ss -Hltnp | grep -vE ' (127\.0\.0\.1|\[::1\]):' || true)
[ -z "$listeners" ] || die "node has TCP listeners on non-loopback addresses: $listeners"
log "node: no TCP listener outside loopback; inbound connections dropped, the agent's outbound QUIC works"

# --- scenario: workload over 50 ms RTT + loss ------------------------------------------------

sc_workload() {
	local t d out n ok=0 code
	# latency check: the forwarder really adds 50 ms per round trip
	t=$(icurl -o /dev/null -w '%{time_starttransfer} %{time_appconnect}' "$(u A /echo)") || { bad "GET failed"; return 1; }
	log "one GET: TLS to the relay done at $(echo "$t" | awk '{printf "%.0f", $2*1000}') ms, first byte at $(echo "$t" | awk '{printf "%.0f", $1*1000}') ms (>= 50 ms expected through the tunnel)"

	# 100 parallel GETs, one h2 connection (a browser loading a page)
	d=$WORK/gets
	mkdir -p "$d"
	local args=()
	for n in $(seq 0 99); do args+=(-o "$d/$n" "$(u A "/echo?i=$n")"); done
	t=$(now_ms)
	icurl --http2 -Z --parallel-max 100 -w '%{http_code} %{http_version} %{time_total} %header{x-app-label}\n' "${args[@]}" >"$d/w" 2>"$d/err"
	code=$?
	d_ms=$(($(now_ms) - t))
	[ $code = 0 ] || { bad "curl --parallel exited $code: $(head -3 "$d/err")"; return 1; }
	out=$("$PY" "$CLIENT" check-gets --dir "$d" --count 100 --label A) || { bad "$out"; return 1; }
	log "$out; all 100 in $(secs $d_ms) s"

	# WebSocket, lock-step: 200 messages of 20..3019 B
	out=$(nsx inet "$PY" "$CLIENT" ws --url "$URL_A" --connect "$DMZ_INET_IP:$HTTPS_PORT" --ca "$CA" --count 200 --timeout 60) || { bad "$out"; return 1; }
	log "$out"

	# the download, byte for byte
	local bytes=$((DOWNLOAD_MB * 1000 * 1000))
	t=$(now_ms)
	out=$(icurl "$(u A "/bytes?n=$bytes")" | "$PY" "$CLIENT" verify-bytes --n "$bytes") || { bad "download: $out"; return 1; }
	log "$DOWNLOAD_MB MB download: $out; $(secs $(($(now_ms) - t))) s in all"
	log "loss rule drops so far (in/egress): $(loss_counters)"
	return 0
}
scenario workload sc_workload || true

# --- scenario: the link down 10 s mid-WebSocket and mid-download ------------------------------

sc_cut10() {
	local mark bytes=$((24 * 1000 * 1000)) wspid dlpid at_cut recover_ms=-1 p0 p ok=1 lost out restored
	mark=$(agent_mark A)
	[ "$(label_of A)" = "200 A" ] || { bad "A's URL does not answer before the cut"; return 1; }
	nsx inet "$PY" "$CLIENT" ws --url "$URL_A" --connect "$DMZ_INET_IP:$HTTPS_PORT" --ca "$CA" \
		--count 300 --interval 0.1 --timeout 120 >"$WORK/cut10.ws" 2>&1 &
	wspid=$!
	rm -f "$WORK/cut10.progress"
	(icurl "$(u A "/bytes?n=$bytes")" | "$PY" "$CLIENT" verify-bytes --n "$bytes" --progress "$WORK/cut10.progress") >"$WORK/cut10.dl" 2>&1 &
	dlpid=$!
	sleep 4
	cut_on
	at_cut=$(cat "$WORK/cut10.progress" 2>/dev/null || echo 0)
	log "link down (download at $((at_cut / 1000000)) of $((bytes / 1000000)) MB, WebSocket sending every 100 ms)"
	sleep "$CUT_SECS"
	cut_off
	restored=$(now_ms)
	p0=$(cat "$WORK/cut10.progress" 2>/dev/null || echo 0)
	log "link up after $(secs $((restored - CUT_AT))) s (download at $((p0 / 1000000)) MB)"
	if [ "$p0" -ge "$bytes" ]; then
		# It all got through during the cut (from the relay's buffers): nothing was in
		# flight across the cut, so it tested nothing. Without loss 24 MB takes ~1 s.
		bad "the download was complete before the link came back: not a mid-download cut"
		ok=0
	fi
	for _ in $(seq 600); do
		p=$(cat "$WORK/cut10.progress" 2>/dev/null || echo 0)
		if [ "$p" != "$p0" ]; then recover_ms=$(($(now_ms) - restored)); break; fi
		kill -0 "$dlpid" 2>/dev/null || break
		sleep 0.1
	done
	wait "$wspid" || ok=0
	wait "$dlpid" || ok=0
	log "websocket: $(tail -n1 "$WORK/cut10.ws")"
	log "download:  $(tail -n1 "$WORK/cut10.dl")"
	if [ "$recover_ms" -ge 0 ]; then
		log "download bytes flowed again $(secs "$recover_ms") s after the link came back"
	fi
	lost=$(agent_lines A "$mark" | grep -E 'lost the connection|reconnect' || true)
	if [ -n "$lost" ] || [ $ok = 0 ]; then
		[ -z "$lost" ] || log "agent A during the cut: $(echo "$lost" | paste -sd'|' -)"
		log "relay's log: A's session lost $(after_cut "$WORK/relay.$RELAY_N.log" 'connection lost.*name=') s after the cut began"
		log "forwarder, per 0.5 s, from 1 s before the cut to 8 s after the link came back (UTC; up = node->relay):"
		awk -v a="$(date -u -d "@$(((CUT_AT_EPOCH - 1000) / 1000))" +%H:%M:%S)" \
			-v b="$(date -u -d "@$((CUT_AT_EPOCH / 1000 + CUT_SECS + 8))" +%H:%M:%S)" \
			'$1 == "udp_delay:" && $2 >= a && $2 <= b' "$WORK/fwd.log" >&2
	fi
	if [ -n "$lost" ]; then
		# Seen here: the relay gives up exactly idle-timeout seconds after the cut began,
		# though the link was back long before. The relay's probes reach the agent after
		# the cut, but the agent (congestion-blocked with download data queued) sends no
		# ACK-only packet (quinn-proto's poll_transmit gate) until its own PTO, backed off
		# to ~2x the cut: node->relay stays silent in the forwarder lines above.
		bad "the QUIC connection did not survive a ${CUT_SECS} s cut (the agent reconnected; the WebSocket died with it)"
		ok=0
	fi
	out=$(label_of A)
	[ "$out" = "200 A" ] || { bad "A's URL answers '$out' after the cut"; ok=0; }
	[ $ok = 1 ] || return 1
	log "same URL, no reconnect, nothing lost"
}
sc_cut10_without_loss() {
	local rc=0
	if [ "${NETNS_CUT10_LOSS:-0}" = 1 ]; then sc_cut10; return; fi
	loss_off || { bad "could not turn the loss off"; return 1; }
	police_on || { bad "could not add the policer"; loss_on; return 1; }
	log "random loss off for this scenario (delay stays); node -> relay UDP policed at 2 MB/s"
	sc_cut10 || rc=1
	log "policer drops: $(nsx node nft list table netdev jgpolice 2>/dev/null | sed -n 's/.*counter packets \([0-9]*\) bytes.*/\1/p')"
	police_off || { bad "could not remove the policer"; rc=1; }
	loss_on || { bad "could not turn the loss back on"; rc=1; }
	return $rc
}
scenario cut10 sc_cut10_without_loss || true

# --- scenario: relay SIGKILL and restart ------------------------------------------------------

AGENT_B_IDLE=5
sc_relaykill() {
	local markA markB t killed restarted codesA="" codesB="" backA=-1 backB=-1 sa sb ok=1
	[ "$(label_of A)" = "200 A" ] || { bad "A's URL does not answer before the kill"; return 1; }
	[ "$(label_of B)" = "200 B" ] || { bad "B's URL does not answer before the kill"; return 1; }
	markA=$(agent_mark A) markB=$(agent_mark B)
	disown "$RELAY_PID" 2>/dev/null || true # no "Killed" notice from bash
	kill -KILL "$RELAY_PID"
	killed=$(now_ms)
	for _ in $(seq 100); do kill -0 "$RELAY_PID" 2>/dev/null || break; sleep 0.05; done
	sleep 1
	start_relay --idle-timeout 5
	restarted=$(now_ms)
	log "relay SIGKILLed, restarted on the same addresses with --idle-timeout 5 ($(secs $((restarted - killed))) s)"
	for _ in $(seq 240); do
		if [ $backA -lt 0 ]; then
			sa=$(label_of A)
			codesA+="${sa%% *} "
			[ "$sa" = "200 A" ] && backA=$(($(now_ms) - killed))
		fi
		if [ $backB -lt 0 ]; then
			sb=$(label_of B)
			codesB+="${sb%% *} "
			[ "$sb" = "200 B" ] && backB=$(($(now_ms) - killed))
		fi
		[ $backA -ge 0 ] && [ $backB -ge 0 ] && break
		sleep 0.25
	done
	log "A: its old URL answers 200 again $(secs $backA) s after the kill; meanwhile (every ~0.25 s): $(tally_runs "$codesA")"
	log "B: its old URL answers 200 again $(secs $backB) s after the kill; meanwhile: $(tally_runs "$codesB")"
	log "agent A: $(agent_lines A "$markA" | grep '^jobgate:' | paste -sd'|' -)"
	log "agent B: $(agent_lines B "$markB" | grep '^jobgate:' | paste -sd'|' -)"
	[ $backA -ge 0 ] || { bad "A did not come back within 60 s"; ok=0; }
	[ $backB -ge 0 ] || { bad "B did not come back within 60 s"; ok=0; }
	agent_lines A "$markA" | grep -q 'reconnected; the URL is unchanged' || { bad "agent A did not report its old name"; ok=0; }
	agent_lines B "$markB" | grep -q 'reconnected; the URL is unchanged' || { bad "agent B did not report its old name"; ok=0; }
	[ "$(head -n1 "$WORK/url.A")" = "$URL_A" ] || { bad "A's URL file changed"; ok=0; }
	[ $ok = 1 ]
}

# --- scenario: link down longer than the idle timeout -----------------------------------------

sc_longcut() {
	local markA markB now inflight seen503="" first503=-1 line code ra restored backA=-1 backB=-1 ok=1 page codes=""
	[ "$(label_of A)" = "200 A" ] && [ "$(label_of B)" = "200 B" ] || { bad "A or B does not answer before the cut"; return 1; }
	markA=$(agent_mark A) markB=$(agent_mark B)
	cut_on
	# A request already on its way when the link goes: how does it end?
	icurl --max-time 30 -o /dev/null -w '%{http_code} after %{time_total} s' "$(u A /echo)" >"$WORK/longcut.inflight" 2>/dev/null &
	inflight=$!
	log "link down for ${LONG_CUT_SECS} s (idle timeout 5 s: relay side, and B's side)"
	while [ $(($(now_ms) - CUT_AT)) -lt $((LONG_CUT_SECS * 1000)) ]; do
		line=$(icurl --max-time 2 -D - -o /dev/null -w 'STATUS %{http_code}\n' "$(u B /echo)" 2>/dev/null || true)
		code=$(printf '%s\n' "$line" | sed -n 's/^STATUS //p')
		ra=$(printf '%s\n' "$line" | tr -d '\r' | sed -n 's/^[Rr]etry-[Aa]fter: *//p')
		now=$(($(now_ms) - CUT_AT))
		codes+="${code:-000}${ra:+/Retry-After:$ra} "
		if [ "$code" = 503 ] && [ $first503 -lt 0 ]; then
			first503=$now
			# what a browser gets: the HTML page that retries by itself
			icurl --max-time 2 -H 'Accept: text/html' -H 'Sec-Fetch-Mode: navigate' -o "$WORK/longcut.page" "$(u B /)" 2>/dev/null || true
			page=$(grep -o '<title>[^<]*' "$WORK/longcut.page" | sed 's/<title>//')
			seen503="Retry-After: ${ra:-none}; the browser page: \"$page\""
			[ -n "$ra" ] || { bad "the 503 has no Retry-After"; ok=0; }
		fi
		sleep 0.5
	done
	cut_off
	restored=$(now_ms)
	wait "$inflight" 2>/dev/null || true
	log "a GET sent to A just as the link went down answered $(cat "$WORK/longcut.inflight")"
	log "during the cut, GET on B's URL (2 s max each, 000 = no answer yet): $(tally_runs "$codes")"
	log "relay saw the agents gone (its log) $(after_cut "$WORK/relay.$RELAY_N.log" 'connection lost.*name=') s into the cut"
	if [ $first503 -ge 0 ]; then
		log "first 503 $(secs $first503) s into the cut; $seen503"
	else
		bad "no 503 page during a ${LONG_CUT_SECS} s cut"
		ok=0
	fi
	for _ in $(seq 240); do
		[ $backA -lt 0 ] && [ "$(label_of A)" = "200 A" ] && backA=$(($(now_ms) - restored))
		[ $backB -lt 0 ] && [ "$(label_of B)" = "200 B" ] && backB=$(($(now_ms) - restored))
		[ $backA -ge 0 ] && [ $backB -ge 0 ] && break
		sleep 0.25
	done
	log "after the link came back: A's old URL answers 200 after $(secs $backA) s, B's after $(secs $backB) s"
	log "agent A: $(agent_lines A "$markA" | grep '^jobgate:' | paste -sd'|' -)"
	log "agent B: $(agent_lines B "$markB" | grep '^jobgate:' | paste -sd'|' -)"
	[ $backA -ge 0 ] && [ $backB -ge 0 ] || { bad "an agent did not come back within 60 s"; ok=0; }
	agent_lines B "$markB" | grep -q 'reconnected; the URL is unchanged' || { bad "agent B did not reconnect under its old name"; ok=0; }
	[ $ok = 1 ]
}

# --- scenario: drain (SIGTERM) and restart ----------------------------------------------------

sc_drain() {
	local markA markB t backA=-1 backB=-1 ok=1
	markA=$(agent_mark A) markB=$(agent_mark B)
	t=$(now_ms)
	kill -TERM "$RELAY_PID"
	for _ in $(seq 300); do kill -0 "$RELAY_PID" 2>/dev/null || break; sleep 0.1; done
	kill -0 "$RELAY_PID" 2>/dev/null && { bad "the relay did not exit within 30 s of SIGTERM"; return 1; }
	log "relay drained and exited $(secs $(($(now_ms) - t))) s after SIGTERM"
	start_relay --idle-timeout 5
	for _ in $(seq 240); do
		[ $backA -lt 0 ] && [ "$(label_of A)" = "200 A" ] && backA=$(($(now_ms) - t))
		[ $backB -lt 0 ] && [ "$(label_of B)" = "200 B" ] && backB=$(($(now_ms) - t))
		[ $backA -ge 0 ] && [ $backB -ge 0 ] && break
		sleep 0.25
	done
	log "old URLs answer again $(secs $backA) s (A) and $(secs $backB) s (B) after SIGTERM"
	log "agent A: $(agent_lines A "$markA" | grep '^jobgate:' | paste -sd'|' -)"
	[ $backA -ge 0 ] && [ $backB -ge 0 ] || { bad "an agent did not come back within 60 s"; ok=0; }
	agent_lines A "$markA" | grep -q 'going away' || { bad "agent A was not told to drain"; ok=0; }
	[ $ok = 1 ]
}

t=$(now_ms)
start_agent B --idle-timeout "$AGENT_B_IDLE"
log "agent B (--idle-timeout $AGENT_B_IDLE) up in $(since "$t") s: $URL_B"
scenario relaykill sc_relaykill || true
scenario longcut sc_longcut || true
scenario drain sc_drain || true

# --- the end: jobs end, URLs die at once -----------------------------------------------------

# A job that ends while a download is running: Bye must still reach the relay.
sc_stop() {
	local dl t code codes="" dead=-1 bytes=$((24 * 1000 * 1000)) ok=1
	(icurl "$(u A "/bytes?n=$bytes")" | "$PY" "$CLIENT" verify-bytes --n "$bytes" --progress "$WORK/stop.progress") >"$WORK/stop.dl" 2>&1 &
	dl=$!
	sleep 3
	log "SIGTERM to agent A with its download at $(($(cat "$WORK/stop.progress" 2>/dev/null || echo 0) / 1000000)) of $((bytes / 1000000)) MB; to B idle"
	t=$(now_ms)
	kill -TERM "$APID_A" "$APID_B" 2>/dev/null || true
	wait "$APID_A" 2>/dev/null || true
	wait "$APID_B" 2>/dev/null || true
	log "agents exited $(since "$t") s after SIGTERM"
	for _ in $(seq 120); do
		code=$(icurl --max-time 2 -o /dev/null -w '%{http_code}' "$(u A /echo)" 2>/dev/null || true)
		codes+="${code:-000} "
		if [ "$code" = 404 ]; then dead=$(($(now_ms) - t)); break; fi
		sleep 0.25
	done
	wait "$dl" 2>/dev/null || true
	code=$(icurl -o /dev/null -w '%{http_code}' "$(u B /echo)" 2>/dev/null || true)
	log "A's URL (mid-download) answered: $(tally_runs "$codes"); B's URL (idle) answers $code"
	[ "$code" = 404 ] || { bad "B's URL answers $code after its job ended, not 404"; ok=0; }
	if [ $dead -lt 0 ]; then
		bad "A's URL still not 404 30 s after its job ended mid-download (the relay never got Bye: parked as if the link had dropped)"
		ok=0
	elif [ $dead -gt 3000 ]; then
		bad "A's URL took $(secs $dead) s to answer 404 after its job ended mid-download (Bye did not get through)"
		ok=0
	else
		log "A's URL answers 404 $(secs $dead) s after SIGTERM"
	fi
	[ $ok = 1 ]
}
scenario stop sc_stop || true
kill -TERM "$FWD_PID" 2>/dev/null || true
wait "$FWD_PID" 2>/dev/null || true
log "forwarder totals: $(sed -n 's/^udp_delay: final //p' "$WORK/fwd.log")"

echo "--- netns scenarios"
for r in "${RESULTS[@]}"; do echo "  $r"; done
[ "$FAILED" = 0 ]
