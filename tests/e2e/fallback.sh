#!/usr/bin/env bash
# The TCP transport with real firewall rules (issue 14): two network namespaces joined by
# a veth pair,
#
#   node (agent + demo app)  ── veth ──  dmz (relay, tinyproxy; the client runs here too)
#   10.98.1.2                            10.98.1.1
#
# node is a firewall-restricted compute node: nftables drops every inbound new connection
# (`ct state established,related accept; policy drop`; loopback allowed). The agent dials
# relay.jobgate.test (→ 10.98.1.1 inside node): QUIC on 7443, the relay's HTTPS port 8443
# for TCP (`--relay-tcp`).
#
# Scenarios, each PASS/FAIL (the script goes on after a FAIL):
#   udpdrop    every UDP datagram leaving node dropped silently (netdev egress, as a site
#              firewall does): `--transport auto` gets a URL within 5 s of its start, says
#              why it is on TCP; page, 64 MiB down and up byte for byte, WebSocket echo;
#              node has no non-loopback listening TCP socket
#   moveback   the UDP drop removed: the same agent moves back to QUIC by itself (it probes
#              every 2 s here), the URL keeps serving, the relay counts it under quic
#   proxyonly  node may only open TCP to tinyproxy (dmz:3128), nothing else out, UDP
#              refused: the agent (https_proxy=...) connects through CONNECT and serves;
#              a proxy that wants credentials (407): exit 4, the message names the proxy
#              and its answer
#
# Run as root. Skips (exit 0) only when network namespaces cannot be made. Installs
# iproute2, nftables, curl, python3, tinyproxy from Debian if missing.
# Knobs: JOBGATE_BIN, FALLBACK_MB (64), E2E_KEEP=1 (keep the work directory).

# shellcheck source=tests/e2e/common.sh
source "$(dirname "$0")/common.sh"

MB=${FALLBACK_MB:-64}
PY=/usr/bin/python3
CLIENT=$E2E_DIR/netns_client.py

P=jf$$
NS_NODE=$P-node
NS_DMZ=$P-dmz
V_NODE=${P}n0
V_DMZ=${P}d0
NODE_IP=10.98.1.2
DMZ_IP=10.98.1.1
HTTPS_PORT=8443
QUIC_PORT=7443
METRICS_PORT=9464
PROXY_PORT=3128
AUTH_PROXY_PORT=3129
RELAY_NAME=relay.$E2E_DOMAIN

PIDS=()
RESULTS=()
FAILED=0
NAMESPACES_MADE=0

cleanup() {
	local code=$? pid ns
	trap - EXIT
	for pid in "${PIDS[@]}"; do
		disown "$pid" 2>/dev/null || true
		kill -TERM "$pid" 2>/dev/null || true
	done
	sleep 0.5
	for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
	if [ "$NAMESPACES_MADE" = 1 ]; then
		for ns in "$NS_NODE" "$NS_DMZ"; do
			for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
			ip netns del "$ns" 2>/dev/null || true
			rm -rf "/etc/netns/$ns"
		done
	fi
	if [ $code -ne 0 ] && [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
		for f in "$WORK"/relay.log "$WORK"/agent.*.log "$WORK"/proxy*.log; do
			[ -f "$f" ] && { echo "--- $f (last 25 lines)" >&2; tail -n 25 "$f" | sed 's/\x1b\[[0-9;]*m//g' >&2; }
		done
	fi
	if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
		if [ "${E2E_KEEP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
	fi
	if [ $code -eq 0 ]; then echo "fallback: PASS in $(since "$T0") s"; else echo "fallback: FAIL (exit $code) after $(since "$T0") s"; fi
	exit $code
}
trap cleanup EXIT

if ! command -v ip >/dev/null; then
	[ "$(id -u)" = 0 ] && apt_install iproute2
fi
if ! command -v ip >/dev/null || ! ip netns add "$P-probe" 2>/dev/null; then
	echo "fallback: SKIP: cannot create network namespaces here (needs root; uid $(id -u))"
	trap - EXIT
	exit 0
fi
ip netns del "$P-probe"
apt_install iproute2 nftables curl ca-certificates python3 tinyproxy

nsx() { # nsx node|dmz COMMAND...
	local ns
	case $1 in node) ns=$NS_NODE ;; dmz) ns=$NS_DMZ ;; *) die "nsx $1" ;; esac
	shift
	ip netns exec "$ns" "$@"
}

# --- plumbing ---------------------------------------------------------------------------

NAMESPACES_MADE=1
for ns in "$NS_NODE" "$NS_DMZ"; do ip netns add "$ns"; done
ip link add "$V_NODE" type veth peer name "$V_DMZ"
ip link set "$V_NODE" netns "$NS_NODE"
ip link set "$V_DMZ" netns "$NS_DMZ"
nsx node ip addr add "$NODE_IP/24" dev "$V_NODE"
nsx dmz ip addr add "$DMZ_IP/24" dev "$V_DMZ"
for pair in "node $V_NODE" "dmz $V_DMZ" "node lo" "dmz lo"; do
	read -r ns dev <<<"$pair"
	nsx "$ns" ip link set "$dev" up
done
mkdir -p "/etc/netns/$NS_NODE"
printf '127.0.0.1 localhost\n%s %s\n' "$DMZ_IP" "$RELAY_NAME" >"/etc/netns/$NS_NODE/hosts"
# The proxy resolves the relay's name too (it lives beside the relay).
mkdir -p "/etc/netns/$NS_DMZ"
printf '127.0.0.1 localhost\n%s %s\n' "$DMZ_IP" "$RELAY_NAME" >"/etc/netns/$NS_DMZ/hosts"

# The compute node's standing rule: nothing comes in that node did not start.
nsx node nft -f - <<-EOF
	table inet jgfw {
		chain input {
			type filter hook input priority 0; policy drop;
			iif lo accept
			ct state established,related accept
		}
	}
EOF
udp_drop_on() { # every datagram leaving node vanishes (no error to the sender)
	nsx node nft -f - <<-EOF
		table netdev jgudp {
			chain egress {
				type filter hook egress device "$V_NODE" priority 0;
				meta l4proto udp counter drop
			}
		}
	EOF
}
udp_drop_off() { nsx node nft delete table netdev jgudp; }
udp_drop_count() { nsx node nft list table netdev jgudp 2>/dev/null | sed -n 's/.*counter packets \([0-9]*\).*/\1/p'; }
proxy_only_on() { # only TCP to the proxy leaves node; UDP is refused (EPERM), as egress ACLs do
	nsx node nft -f - <<-EOF
		table inet jgproxy {
			chain output {
				type filter hook output priority 0; policy drop;
				oif lo accept
				ct state established,related accept
				ip daddr $DMZ_IP tcp dport { $PROXY_PORT, $AUTH_PROXY_PORT } accept
				meta l4proto udp counter reject
			}
		}
	EOF
}

# --- the jobgate side -------------------------------------------------------------------

WORK=$(mktemp -d /tmp/jobgate-fallback.XXXXXX)
chmod 755 "$WORK"
[ -x "$JOBGATE_BIN" ] || die "no jobgate binary at $JOBGATE_BIN (cargo build, or set JOBGATE_BIN)"
install -m 755 "$JOBGATE_BIN" "$WORK/jobgate"
J=$WORK/jobgate
"$J" dev-cert --domain "$E2E_DOMAIN" --out "$WORK/pki" >/dev/null
CA=$WORK/pki/ca.pem
mkdir -p "$WORK/relay"
(umask 077 && "$J" token issue --tokens "$WORK/relay/tokens.toml" --user alice 2>/dev/null >"$WORK/token")
[ -s "$WORK/token" ] || die "token issue printed no token"

ip netns exec "$NS_DMZ" "$J" relay --domain "$E2E_DOMAIN" --cert "$WORK/pki/cert.pem" --key "$WORK/pki/key.pem" \
	--tokens "$WORK/relay/tokens.toml" --listen-https "$DMZ_IP:$HTTPS_PORT" --listen-quic "$DMZ_IP:$QUIC_PORT" \
	--listen-metrics "127.0.0.1:$METRICS_PORT" >"$WORK/relay.log" 2>&1 &
PIDS+=("$!")

dcurl() { nsx dmz curl -sS --cacert "$CA" --connect-to "::$DMZ_IP:$HTTPS_PORT" "$@"; }
for _ in $(seq 100); do
	dcurl -o /dev/null "https://probe.$E2E_DOMAIN:$HTTPS_PORT/" 2>/dev/null && break
	sleep 0.1
done
dcurl -o /dev/null "https://probe.$E2E_DOMAIN:$HTTPS_PORT/" || die "the relay did not answer"

for spec in "$PROXY_PORT proxy" "$AUTH_PROXY_PORT proxy-auth"; do
	read -r port name <<<"$spec"
	{
		printf 'Port %s\nListen %s\nTimeout 60\nMaxClients 50\nAllow %s\nLogLevel Connect\n' "$port" "$DMZ_IP" "$NODE_IP"
		[ "$name" = proxy-auth ] && printf 'BasicAuth jobs s3cret\n'
	} >"$WORK/$name.conf"
	ip netns exec "$NS_DMZ" tinyproxy -d -c "$WORK/$name.conf" >"$WORK/$name.log" 2>&1 &
	PIDS+=("$!")
done

# start_agent LABEL [AGENT ARGS...]: sets URL_<LABEL>, HOST_<LABEL>, KEY_<LABEL>, APID_<LABEL>,
# and SECS_<LABEL> (from start to the URL).
start_agent() {
	local label=$1 url pid t
	shift
	t=$(now_ms)
	ip netns exec "$NS_NODE" env "${AGENT_ENV[@]}" "$J" agent --relay "$RELAY_NAME:$QUIC_PORT" \
		--relay-tcp "$RELAY_NAME:$HTTPS_PORT" --relay-ca "$CA" --token-file "$WORK/token" \
		--url-file "$WORK/url.$label" "$@" -- "$J" demo-app --listen '127.0.0.1:{port}' --label "$label" \
		>"$WORK/agent.$label.log" 2>&1 &
	pid=$!
	PIDS+=("$pid")
	url=$(wait_for_file_line "$WORK/url.$label" 30) || { cat "$WORK/agent.$label.log" >&2; return 1; }
	printf -v "SECS_$label" '%s' "$(since "$t")"
	printf -v "URL_$label" '%s' "$url"
	printf -v "HOST_$label" '%s' "$(printf '%s' "$url" | sed -E 's#^https://([^:/]+).*#\1#')"
	printf -v "KEY_$label" '%s' "${url##*jobgate_key=}"
	printf -v "APID_$label" '%s' "$pid"
}
AGENT_ENV=(-u https_proxy -u HTTPS_PROXY -u all_proxy -u ALL_PROXY)

u() { # u LABEL PATH -> the session URL of agent LABEL for PATH
	local host key sep='?'
	host=HOST_$1 key=KEY_$1
	case $2 in *\?*) sep='&' ;; esac
	printf 'https://%s:%s%s%sjobgate_key=%s' "${!host}" "$HTTPS_PORT" "$2" "$sep" "${!key}"
}
label_of() { dcurl --max-time 5 -o /dev/null -w '%{http_code} %header{x-app-label}' "$(u "$1" /echo)" 2>/dev/null || true; }
agent_says() { sed 's/\x1b\[[0-9;]*m//g' "$WORK/agent.$1.log" | grep -F "$2"; }
metric() { nsx dmz curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | awk -v s="$1" '$1 == s { print $2 }'; }

scenario() {
	local name=$1 t result
	t=$(now_ms)
	log "=== scenario $name"
	if "$2"; then result=PASS; else result=FAIL; FAILED=$((FAILED + 1)); fi
	RESULTS+=("$(printf '%-10s %s  %6s s' "$name" "$result" "$(since "$t")")")
	log "=== scenario $name: $result ($(since "$t") s)"
}
bad() { log "FAIL: $*"; return 1; }

# Page, MB down and up byte for byte, WebSocket echo, on agent LABEL.
workload() {
	local label=$1 out
	[ "$(label_of "$label")" = "200 $label" ] || bad "GET /echo: $(label_of "$label")" || return 1
	out=$(dcurl --max-time 300 "$(u "$label" "/bytes?n=$((MB * 1048576))")" | "$PY" "$CLIENT" verify-bytes --n $((MB * 1048576))) ||
		bad "download: $out" || return 1
	log "  down: $out"
	head -c $((MB * 1048576)) /dev/urandom >"$WORK/upload.bin"
	out=$(dcurl --max-time 300 -H 'content-type: application/octet-stream' --data-binary "@$WORK/upload.bin" "$(u "$label" /echo)")
	[ "$("$PY" -c 'import json,sys; print(json.load(sys.stdin)["body_bytes"])' <<<"$out")" = $((MB * 1048576)) ] ||
		bad "upload: the app got ${out:0:200}" || return 1
	log "  up: $MB MiB arrived whole"
	out=$(nsx dmz "$PY" "$CLIENT" ws --url "$(u "$label" /ws)" --connect "$DMZ_IP:$HTTPS_PORT" --ca "$CA" --count 100) ||
		bad "websocket: $out" || return 1
	log "  ws: $out"
}

sc_udpdrop() {
	udp_drop_on
	start_agent tcp --quic-reprobe 2 || bad "no URL" || return 1
	log "  URL after $SECS_tcp s (limit 5 s): $URL_tcp"
	agent_says tcp "connected over TCP/TLS to $RELAY_NAME:$HTTPS_PORT: no QUIC answer from $RELAY_NAME:$QUIC_PORT in 3 s" >/dev/null ||
		bad "the agent did not say it fell back, and why: $(cat "$WORK/agent.tcp.log")" || return 1
	awk -v s="$SECS_tcp" 'BEGIN { exit !(s <= 5.0) }' || bad "URL after $SECS_tcp s, over 5 s" || return 1
	[ "$(udp_drop_count)" -gt 0 ] || bad "the firewall dropped no UDP: QUIC was never tried" || return 1
	workload tcp || return 1
	local listeners
	# (The agent's only other sockets are its outgoing ones: TCP to the relay, and the UDP
	# socket of a QUIC probe, which takes packets from its relay only.)
	listeners=$(nsx node ss -Hltn | awk '$4 !~ /^127\.0\.0\.1:|^\[::1\]:/' || true)
	[ -z "$listeners" ] || bad "node listens beyond loopback: $listeners" || return 1
	[ "$(metric 'jobgate_sessions_by_transport{transport="tcp"}')" = 1 ] || bad "the relay does not count the TCP session" || return 1
	log "  node listens on loopback only; relay counts 1 TCP session; $(udp_drop_count) UDP datagrams dropped"
}

sc_moveback() {
	local t
	t=$(now_ms)
	udp_drop_off
	for _ in $(seq 150); do
		agent_says tcp "QUIC answers again: moved to QUIC" >/dev/null && break
		sleep 0.2
	done
	agent_says tcp "QUIC answers again: moved to QUIC to $RELAY_NAME:$QUIC_PORT; the URL is unchanged" >/dev/null ||
		bad "the agent did not move back to QUIC: $(tail -5 "$WORK/agent.tcp.log")" || return 1
	log "  moved back to QUIC $(since "$t") s after UDP passed again"
	for _ in $(seq 50); do [ "$(label_of tcp)" = "200 tcp" ] && break; sleep 0.2; done
	[ "$(label_of tcp)" = "200 tcp" ] || bad "the URL stopped serving: $(label_of tcp)" || return 1
	for _ in $(seq 50); do [ "$(metric 'jobgate_sessions_by_transport{transport="quic"}')" = 1 ] && break; sleep 0.2; done
	[ "$(metric 'jobgate_sessions_by_transport{transport="quic"}')" = 1 ] &&
		[ "$(metric 'jobgate_sessions_by_transport{transport="tcp"}')" = 0 ] ||
		bad "the relay still counts TCP: $(nsx dmz curl -s "http://127.0.0.1:$METRICS_PORT/metrics" | grep by_transport)" || return 1
	out=$(nsx dmz "$PY" "$CLIENT" ws --url "$(u tcp /ws)" --connect "$DMZ_IP:$HTTPS_PORT" --ca "$CA" --count 20) ||
		bad "websocket after the move: $out" || return 1
	log "  same URL serves over QUIC; ws: $out"
	kill -TERM "$APID_tcp" 2>/dev/null || true
}

sc_proxyonly() {
	proxy_only_on
	AGENT_ENV=(https_proxy="http://$DMZ_IP:$PROXY_PORT" NO_PROXY=localhost)
	start_agent proxied || bad "no URL through the proxy" || return 1
	agent_says proxied "connected over TCP/TLS to $RELAY_NAME:$HTTPS_PORT through proxy http://$DMZ_IP:$PROXY_PORT" >/dev/null ||
		bad "the agent did not say it uses the proxy: $(cat "$WORK/agent.proxied.log")" || return 1
	grep -q "CONNECT" "$WORK/proxy.log" || bad "tinyproxy saw no CONNECT" || return 1
	log "  URL through the proxy after $SECS_proxied s"
	MB=8 workload proxied || return 1

	local code
	AGENT_ENV=(https_proxy="http://$DMZ_IP:$AUTH_PROXY_PORT")
	ip netns exec "$NS_NODE" env "${AGENT_ENV[@]}" "$J" agent --relay "$RELAY_NAME:$QUIC_PORT" \
		--relay-tcp "$RELAY_NAME:$HTTPS_PORT" --relay-ca "$CA" --token-file "$WORK/token" \
		--to 127.0.0.1:9 >"$WORK/agent.auth.log" 2>&1 && code=0 || code=$?
	[ "$code" = 4 ] || bad "a proxy asking for credentials: exit $code, want 4: $(cat "$WORK/agent.auth.log")" || return 1
	agent_says auth "proxy http://$DMZ_IP:$AUTH_PROXY_PORT refused CONNECT to $RELAY_NAME:$HTTPS_PORT" | grep -q 407 ||
		bad "the error does not name the proxy and its 407: $(cat "$WORK/agent.auth.log")" || return 1
	log "  407: exit 4, $(agent_says auth 'refused CONNECT' | tail -1)"
	AGENT_ENV=(-u https_proxy -u HTTPS_PROXY -u all_proxy -u ALL_PROXY)
}

scenario udpdrop sc_udpdrop
scenario moveback sc_moveback
scenario proxyonly sc_proxyonly

log "results:"
for r in "${RESULTS[@]}"; do log "  $r"; done
[ "$FAILED" = 0 ] || die "$FAILED scenario(s) failed"
