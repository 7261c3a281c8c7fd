#!/usr/bin/env python3
"""Client-side checks for tests/e2e/netns.sh (standard library only).

    netns_client.py ws --url URL --connect IP:PORT --ca CA --count N [--interval S]
        Opens a WebSocket to URL's /ws (the demo app echoes), sends N text messages of
        varying size and checks every echo arrives, intact and in order. --interval 0 is
        lock-step (send, wait for the echo: round-trip times); otherwise messages are sent
        every S seconds regardless of echoes (a link cut shows as one long gap).
    netns_client.py verify-bytes --n N [--progress FILE]
        Reads stdin and checks it is exactly the demo app's /bytes?n=N body
        (byte at offset o == o % 251); prints the size, sha256, time and throughput.
        --progress: keeps FILE holding the byte count so far (rewritten every 0.2 s).
    netns_client.py check-gets --dir D --count N --label L
        Checks the N curl outputs D/<i> of /echo?i=<i> (and the curl -w lines in D/w).
Exit status 0 only if the check passed; one summary line on stdout.
"""

import argparse
import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import sys
import time
import urllib.parse

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def fail(msg):
    print("FAIL: " + msg, flush=True)
    sys.exit(1)


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# --- WebSocket -------------------------------------------------------------------------


class Ws:
    def __init__(self, url, connect, ca, timeout):
        u = urllib.parse.urlsplit(url)
        self.host = u.hostname
        port = u.port or 443
        key_q = urllib.parse.parse_qs(u.query).get("jobgate_key", [""])[0]
        ip, _, cport = connect.rpartition(":")
        ctx = ssl.create_default_context(cafile=ca)
        ctx.set_alpn_protocols(["http/1.1"])
        raw = socket.create_connection((ip, int(cport)), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname=self.host)
        key = base64.b64encode(os.urandom(16)).decode()
        path = "/ws?jobgate_key=" + urllib.parse.quote(key_q)
        req = (
            "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: demo\r\n"
            "Origin: https://%s:%d\r\n\r\n" % (path, self.host, port, key, self.host, port)
        )
        self.sock.sendall(req.encode())
        self.buf = bytearray()
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                fail("connection closed during the WebSocket handshake")
            self.buf += chunk
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            fail("WebSocket handshake answered %r" % lines[0])
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        want = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != want:
            fail("bad Sec-WebSocket-Accept")

    def send(self, opcode, payload):
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big") if n else b""
        self.sock.sendall(head + mask + masked)

    def poll(self, timeout):
        """Reads what arrives within `timeout` s; returns the complete messages (opcode, payload)."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                fail("the WebSocket connection was closed (after %d buffered bytes)" % len(self.buf))
            self.buf += chunk
        except (socket.timeout, ssl.SSLWantReadError):
            pass
        out = []
        while len(self.buf) >= 2:
            b0, b1 = self.buf[0], self.buf[1]
            n, off = b1 & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    break
                n, off = struct.unpack("!H", self.buf[2:4])[0], 4
            elif n == 127:
                if len(self.buf) < 10:
                    break
                n, off = struct.unpack("!Q", self.buf[2:10])[0], 10
            if b1 & 0x80:
                fail("the server masked a frame")
            if len(self.buf) < off + n:
                break
            payload = bytes(self.buf[off : off + n])
            del self.buf[: off + n]
            opcode = b0 & 0x0F
            if not b0 & 0x80:
                fail("fragmented frames are not expected from the demo app")
            if opcode == 0x9:
                self.send(0xA, payload)
            elif opcode == 0x8:
                fail("the server closed the WebSocket: %r" % payload[:2])
            elif opcode in (0x1, 0x2):
                out.append(payload)
        return out


def message(i):
    body = ("m%05d:" % i).encode()
    size = 20 + (i * 7919) % 3000
    return body + (b"abcdefghijklmnopqrstuvwxyz0123456789" * (size // 36 + 1))[: size - len(body)]


def cmd_ws(args):
    t0 = time.monotonic()
    ws = Ws(args.url, args.connect, args.ca, args.timeout)
    handshake = time.monotonic() - t0
    expected = [message(i) for i in range(args.count)]
    sent_at = []
    rtts = []
    got = 0
    last_arrival = time.monotonic()
    longest_gap = 0.0
    deadline = time.monotonic() + args.timeout
    start = time.monotonic()
    progress = time.monotonic() + 5

    def receive(msgs):
        nonlocal got, last_arrival, longest_gap
        now = time.monotonic()
        for m in msgs:
            if got >= args.count:
                fail("unexpected extra message %r" % m[:12])
            if m != expected[got]:
                fail("message %d: got %r... (%d B), expected %r... (%d B): lost, reordered or corrupted"
                     % (got, m[:8], len(m), expected[got][:8], len(expected[got])))
            rtts.append(now - sent_at[got])
            longest_gap = max(longest_gap, now - last_arrival)
            last_arrival = now
            got += 1

    if args.interval <= 0:
        for i in range(args.count):
            sent_at.append(time.monotonic())
            ws.send(0x1, expected[i])
            while got <= i:
                if time.monotonic() > deadline:
                    fail("timed out waiting for echo %d of %d" % (got, args.count))
                receive(ws.poll(1.0))
    else:
        while got < args.count:
            now = time.monotonic()
            if now > deadline:
                fail("timed out: %d of %d echoes, %d sent" % (got, args.count, len(sent_at)))
            if len(sent_at) < args.count:
                due = start + len(sent_at) * args.interval
                if now >= due:
                    sent_at.append(now)
                    ws.send(0x1, expected[len(sent_at) - 1])
                    continue
                wait = due - now
            else:
                wait = 1.0
            receive(ws.poll(wait))
            if args.progress and now > progress:
                progress = now + 5
                print("  ws: %.0f s: %d sent, %d echoed" % (now - start, len(sent_at), got), flush=True)
    total = time.monotonic() - start
    try:
        ws.send(0x8, struct.pack("!H", 1000))
    except OSError:
        pass
    print("ws: %d/%d echoes intact and in order; handshake %.0f ms; round trip p50 %.0f ms, p99 %.0f ms, "
          "max %.0f ms; longest gap between echoes %.1f s; %.1f s in all"
          % (got, args.count, handshake * 1000, pct(rtts, 0.5) * 1000, pct(rtts, 0.99) * 1000,
             max(rtts) * 1000, longest_gap, total), flush=True)


# --- /bytes ----------------------------------------------------------------------------


def cmd_verify_bytes(args):
    chunk = 1 << 20
    block = bytes(i % 251 for i in range(251 * (chunk // 251 + 2)))
    offset = 0
    digest = hashlib.sha256()
    t0 = None
    stdin = sys.stdin.buffer
    next_progress = 0.0

    def progress(force=False):
        nonlocal next_progress
        if args.progress and (force or time.monotonic() >= next_progress):
            next_progress = time.monotonic() + 0.2
            with open(args.progress + ".tmp", "w") as f:
                f.write("%d\n" % offset)
            os.replace(args.progress + ".tmp", args.progress)

    while True:
        data = stdin.read1(chunk) if hasattr(stdin, "read1") else stdin.read(chunk)
        if not data:
            break
        if t0 is None:
            t0 = time.monotonic()
        start = offset % 251
        if data != block[start : start + len(data)]:
            for k, b in enumerate(data):
                if b != (offset + k) % 251:
                    fail("byte %d is %d, expected %d" % (offset + k, b, (offset + k) % 251))
        digest.update(data)
        offset += len(data)
        progress()
    progress(force=True)
    took = time.monotonic() - (t0 or time.monotonic())
    if offset != args.n:
        fail("got %d bytes, expected %d" % (offset, args.n))
    expected = hashlib.sha256()
    left = args.n
    while left:
        k = min(left, chunk // 251 * 251)
        expected.update(block[:k])
        left -= k
    if digest.hexdigest() != expected.hexdigest():
        fail("sha256 %s != expected %s" % (digest.hexdigest(), expected.hexdigest()))
    print("bytes: %d B byte-exact, sha256 %s..., %.1f s from the first byte, %.2f MB/s"
          % (offset, digest.hexdigest()[:16], took, offset / 1e6 / max(took, 1e-9)), flush=True)


# --- parallel GETs ---------------------------------------------------------------------


def cmd_check_gets(args):
    times = []
    versions = set()
    labels = set()
    codes = {}
    with open(os.path.join(args.dir, "w")) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4:
                continue
            code, version, total, label = parts[:4]
            codes[code] = codes.get(code, 0) + 1
            versions.add(version)
            labels.add(label)
            times.append(float(total))
    if codes.get("200", 0) != args.count:
        fail("status codes %r, expected %d x 200" % (codes, args.count))
    if labels != {args.label}:
        fail("x-app-label %r, expected only %r (misrouted?)" % (labels, args.label))
    for i in range(args.count):
        try:
            with open(os.path.join(args.dir, str(i))) as f:
                body = json.load(f)
        except (OSError, ValueError) as e:
            fail("response %d unreadable: %s" % (i, e))
        target = urllib.parse.urlsplit(body.get("target", ""))
        q = urllib.parse.parse_qs(target.query)
        if target.path != "/echo" or q.get("i") != [str(i)]:
            fail("response %d answers %r (mixed up)" % (i, body.get("target")))
        if "jobgate_key" in q:
            fail("the access key reached the app")
    print("gets: %d/%d OK, each the answer to its own request; HTTP version %s; per request p50 %.0f ms, "
          "p99 %.0f ms, max %.0f ms"
          % (args.count, args.count, "/".join(sorted(versions)), pct(times, 0.5) * 1000,
             pct(times, 0.99) * 1000, max(times) * 1000), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("ws")
    w.add_argument("--url", required=True)
    w.add_argument("--connect", required=True)
    w.add_argument("--ca", required=True)
    w.add_argument("--count", type=int, default=200)
    w.add_argument("--interval", type=float, default=0)
    w.add_argument("--timeout", type=float, default=60)
    w.add_argument("--progress", action="store_true")
    v = sub.add_parser("verify-bytes")
    v.add_argument("--n", type=int, required=True)
    v.add_argument("--progress")
    g = sub.add_parser("check-gets")
    g.add_argument("--dir", required=True)
    g.add_argument("--count", type=int, required=True)
    g.add_argument("--label", required=True)
    args = p.parse_args()
    {"ws": cmd_ws, "verify-bytes": cmd_verify_bytes, "check-gets": cmd_check_gets}[args.cmd](args)


if __name__ == "__main__":
    main()
