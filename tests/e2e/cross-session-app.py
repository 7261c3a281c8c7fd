#!/usr/bin/env python3
"""A tiny web app for cross-session-browser.sh, run by a jobgate agent as a job's app.

Python's standard library only. It plays both sessions of the test:

* ``GET /``            the session's own page (the victim uses it from its own origin);
* ``POST /echo``       answers with the body it got (the victim's own fetch; the attack's target);
* ``GET /ws``          a WebSocket echo (text and binary frames, ping, close);
* ``GET /log``         JSON list of every request this app has seen ("METHOD target"),
                       so the browser can check that no attack request ever reached it;
* ``GET /attack.html`` the attacker's page: with the victim's cookie in the browser, it
                       POSTs into the victim's session and opens a WebSocket to it, and
                       writes what happened into ``#result`` as JSON; it also has a
                       plain link to the victim's session (``#link``) and tosses a
                       cookie for the parent domain (``jobgate_e2e_tossed``).

Every request is also printed to stderr as
``[app LABEL] METHOD target origin=... cookies=NAME,NAME`` (names only, never values).
Usage: cross-session-app.py --port PORT --label LABEL
"""

import argparse
import base64
import hashlib
import json
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Frames bigger than this are refused: the test only sends short messages.
MAX_FRAME = 1 << 20

OWN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>session</title></head>
<body><h1 id="label">LABEL</h1><p>A jobgate test session.</p></body></html>
"""

ATTACK_PAGE = r"""<!doctype html><html><head><meta charset="utf-8"><title>attack</title></head>
<body><h1>a page served by another session</h1><pre id="result"></pre>
<p><a id="link">a plain link to the victim's session</a></p>
<script>
(async () => {
  const victim = new URLSearchParams(location.search).get('victim');
  document.getElementById('link').href = victim + '/?from=link';
  // Cookie tossing: a cookie for the parent domain reaches every sibling's app unless the
  // domain is a public suffix (the relay cannot stop it; the script reports it).
  const parent = location.hostname.split('.').slice(1).join('.');
  document.cookie = `jobgate_e2e_tossed=1; domain=${parent}; path=/; Secure`;
  const result = { page: location.origin, victim };
  // A POST into the victim's session with the browser's cookies (the answer is opaque to
  // this page; what matters is whether the victim's app acted on it).
  try {
    await fetch(victim + '/echo?from=attack-post', {
      method: 'POST', credentials: 'include', mode: 'no-cors', body: 'attack',
    });
    result.post = 'sent';
  } catch (e) {
    result.post = 'error: ' + e;
  }
  // A cross-origin read attempt (CORS GET with credentials).
  try {
    const r = await fetch(victim + '/echo?from=attack-cors', { credentials: 'include' });
    result.cors = 'read ' + r.status + ': ' + (await r.text()).slice(0, 80);
  } catch (e) {
    result.cors = 'error';
  }
  // A WebSocket into the victim's session: it must never open.
  result.ws = await new Promise((resolve) => {
    const ws = new WebSocket(victim.replace(/^https:/, 'wss:') + '/ws?from=attack-ws');
    const timer = setTimeout(() => resolve('timeout'), 15000);
    ws.onopen = () => ws.send('steal');
    ws.onmessage = (m) => { clearTimeout(timer); resolve('open, read: ' + m.data); ws.close(); };
    ws.onerror = () => { clearTimeout(timer); resolve('refused'); };
  });
  document.getElementById('result').textContent = JSON.stringify(result);
})();
</script></body></html>
"""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    label = "app"
    seen = []
    seen_lock = threading.Lock()

    def log_message(self, fmt, *args):  # the request line is logged by `note` instead
        pass

    def note(self):
        origin = self.headers.get("Origin", "-")
        # Cookie names only (values may be secrets).
        cookies = ",".join(
            pair.split("=", 1)[0].strip()
            for pair in self.headers.get("Cookie", "").split(";")
            if pair.strip()
        )
        line = f"{self.command} {self.path}"
        with self.seen_lock:
            self.seen.append(line)
        print(
            f"[app {self.label}] {line} origin={origin} cookies={cookies or '-'}",
            file=sys.stderr,
            flush=True,
        )

    def answer(self, status, body, content_type="text/plain; charset=utf-8"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-App-Label", self.label)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self):
        self.note()
        path = self.path.split("?", 1)[0]
        if path == "/":
            self.answer(200, OWN_PAGE.replace("LABEL", self.label), "text/html; charset=utf-8")
        elif path == "/attack.html":
            self.answer(200, ATTACK_PAGE, "text/html; charset=utf-8")
        elif path == "/log":
            with self.seen_lock:
                seen = list(self.seen)
            self.answer(200, json.dumps(seen), "application/json")
        elif path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self.websocket()
        elif path == "/echo":
            self.answer(200, f"{self.label} got GET\n")
        else:
            self.answer(404, "not found\n")

    def do_HEAD(self):
        self.do_GET()

    def do_POST(self):
        self.note()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path.split("?", 1)[0] == "/echo":
            self.answer(200, f"{self.label} got POST: {body.decode(errors='replace')}\n")
        else:
            self.answer(404, "not found\n")

    def websocket(self):
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while True:
            frame = self.read_frame()
            if frame is None:
                return
            opcode, payload = frame
            if opcode == 0x8:
                self.send_frame(0x8, payload[:2])
                return
            if opcode == 0x9:
                self.send_frame(0xA, payload)
            elif opcode in (0x1, 0x2):
                self.send_frame(opcode, payload)

    def read_frame(self):
        head = self.rfile.read(2)
        if len(head) < 2:
            return None
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self.rfile.read(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self.rfile.read(8))
        if length > MAX_FRAME:
            return None
        mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
        data = self.rfile.read(length)
        return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))

    def send_frame(self, opcode, payload):
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        self.wfile.write(head + payload)
        self.wfile.flush()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--label", required=True)
    args = parser.parse_args()
    Handler.label = args.label
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
