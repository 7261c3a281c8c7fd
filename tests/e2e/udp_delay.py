#!/usr/bin/env python3
"""A UDP forwarder that delays every datagram by a fixed time, each way.

    udp_delay.py --listen 10.0.0.1:7000 --upstream 127.0.0.1:7443 --delay-ms 25

The kernel here has no netem qdisc, so tests/e2e/netns.sh puts this between the agent and
the relay: the agent dials the forwarder, which relays each client address through its
own upstream socket (like a NAT), so 25 ms each way is a 50 ms round trip. The order of
datagrams is kept (a constant delay never reorders). A datagram that cannot be sent at
once (socket buffer full) is dropped, as a router queue would. Counters are printed every
--stats seconds (per-interval counts, UTC time) and on SIGTERM. Standard library only.
"""

import argparse
import collections
import selectors
import signal
import socket
import sys
import time

BUFFER = 4 * 1024 * 1024
IDLE_EXPIRY = 300.0  # seconds after which an unused upstream socket is closed


def addr(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=addr, required=True)
    p.add_argument("--upstream", type=addr, required=True)
    p.add_argument("--delay-ms", type=float, default=25.0)
    p.add_argument("--stats", type=float, default=0, help="print counters every N s (0: only at exit)")
    args = p.parse_args()
    delay = args.delay_ms / 1000.0

    sel = selectors.DefaultSelector()
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        listener.setsockopt(socket.SOL_SOCKET, opt, BUFFER)
    listener.bind(args.listen)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)

    upstream_of = {}  # client address -> upstream socket
    client_of = {}  # upstream socket -> client address
    last_used = {}  # upstream socket -> monotonic time
    queue = collections.deque()  # (due, socket, payload, destination or None)
    counts = {"up": 0, "down": 0, "up_bytes": 0, "down_bytes": 0, "dropped": 0, "clients": 0}
    running = [True]

    last = dict(counts)

    def stats(final=False):
        if final:
            print(
                "udp_delay: final up %d pkts %d B, down %d pkts %d B, dropped %d, clients %d"
                % (counts["up"], counts["up_bytes"], counts["down"], counts["down_bytes"],
                   counts["dropped"], counts["clients"]),
                flush=True,
            )
            return
        # One line per interval with traffic: wall-clock time and what passed each way.
        d = {k: counts[k] - last[k] for k in counts}
        last.update(counts)
        if d["up"] or d["down"] or d["dropped"]:
            print(
                "udp_delay: %s up %d pkts %d B, down %d pkts %d B, dropped %d"
                % (time.strftime("%H:%M:%S", time.gmtime()) + ".%03d" % (time.time() % 1 * 1000),
                   d["up"], d["up_bytes"], d["down"], d["down_bytes"], d["dropped"]),
                flush=True,
            )

    def stop(*_):
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("udp_delay: %s:%d -> %s:%d, %.1f ms each way" % (*args.listen, *args.upstream, args.delay_ms), flush=True)

    next_stats = time.monotonic() + args.stats if args.stats else None
    next_expiry = time.monotonic() + 30
    while running[0]:
        now = time.monotonic()
        timeout = 0.5
        if queue:
            timeout = max(0.0, min(timeout, queue[0][0] - now))
        try:
            events = sel.select(timeout)
        except InterruptedError:
            continue
        for key, _ in events:
            sock = key.fileobj
            while True:
                try:
                    data, source = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break  # e.g. ECONNREFUSED from a previous send upstream: keep going
                now = time.monotonic()
                if sock is listener:
                    up = upstream_of.get(source)
                    if up is None:
                        up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                            up.setsockopt(socket.SOL_SOCKET, opt, BUFFER)
                        up.connect(args.upstream)
                        up.setblocking(False)
                        sel.register(up, selectors.EVENT_READ)
                        upstream_of[source] = up
                        client_of[up] = source
                        counts["clients"] += 1
                    last_used[up] = now
                    queue.append((now + delay, up, data, None))
                    counts["up"] += 1
                    counts["up_bytes"] += len(data)
                else:
                    last_used[sock] = now
                    queue.append((now + delay, listener, data, client_of[sock]))
                    counts["down"] += 1
                    counts["down_bytes"] += len(data)
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, sock, data, dest = queue.popleft()
            try:
                if dest is None:
                    sock.send(data)
                else:
                    sock.sendto(data, dest)
            except OSError:
                counts["dropped"] += 1
        if next_stats and now >= next_stats:
            stats()
            next_stats = now + args.stats
        if now >= next_expiry:
            next_expiry = now + 30
            for up, used in list(last_used.items()):
                if now - used > IDLE_EXPIRY:
                    sel.unregister(up)
                    del upstream_of[client_of.pop(up)]
                    del last_used[up]
                    up.close()
    stats(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
