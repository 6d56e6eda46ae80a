#!/usr/bin/env python3
"""The abuse cases of docs/SECURITY.md, measured against a real `hearth up` (embedded: no server
needed), as an attacker on the same machine would run them. Prints one line per case; the
figures in docs/SECURITY.md come from here.

Usage: cargo build --release && python3 scripts/audit.py [path/to/hearth]

Needs only Python's standard library and mosquitto_pub. Everything runs on loopback, against a
hearth of its own (temporary data folder, free ports), bounded in count and time.
"""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

ADMIN = "audit-admin-token-0123456789"
HERE = os.path.dirname(os.path.abspath(__file__))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "target", "release", "hearth")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


class Hearth:
    def __init__(self, **settings):
        self.dir = tempfile.mkdtemp(prefix="hearth-audit-")
        self.api = free_port()
        self.mqtt = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
        env.update({
            "HEARTH_API_LISTEN": f"127.0.0.1:{self.api}",
            "HEARTH_MQTT_LISTEN": f"127.0.0.1:{self.mqtt}",
            "HEARTH_DATA_DIR": os.path.join(self.dir, "data"),
            "HEARTH_ADMIN_TOKEN": ADMIN,
            "HEARTH_LOG": "warn",
        })
        env.update({f"HEARTH_{k.upper()}": str(v) for k, v in settings.items()})
        self.env = env
        self.log = open(os.path.join(self.dir, "up.log"), "w")
        self.proc = subprocess.Popen([BIN, "up"], env=env, cwd=self.dir, stdout=self.log, stderr=self.log)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                self.get("/healthz", token=None)
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("hearth did not start")

    def request(self, method, path, body=None, token=ADMIN):
        req = urllib.request.Request(f"http://127.0.0.1:{self.api}{path}", method=method, data=body)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path, token=ADMIN):
        return self.request("GET", path, token=token)

    def json(self, path, token=ADMIN):
        return json.loads(self.get(path, token)[1] or b"null")

    def hearth(self, *args):
        return subprocess.run([BIN, *args], env=self.env, cwd=self.dir, capture_output=True, text=True)

    def drained(self):
        deadline = time.time() + 120
        while time.time() < deadline:
            status = json.loads(self.hearth("status", "--json").stdout or "{}")
            if status.get("events", {}).get("in_flight", 1) == 0:
                return
            time.sleep(0.2)

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def publish(port, topic, payload_file, qos=1):
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", str(qos),
                    "-t", topic, "-f", payload_file], check=True)


def mqtt_connect(port, client_id, keep_alive=60, login=None):
    s = socket.create_connection(("127.0.0.1", port))
    cid = client_id.encode()
    flags = 0x02
    payload = struct.pack("!H", len(cid)) + cid
    if login:
        flags |= 0xC0
        for part in login:
            b = part.encode()
            payload += struct.pack("!H", len(b)) + b
    var = b"\x00\x04MQTT\x04" + bytes([flags]) + struct.pack("!H", keep_alive)
    s.sendall(packet(0x10, var + payload))
    ack = s.recv(4)
    return s, ack[3] if len(ack) == 4 else None


def remaining(n):
    out = b""
    while True:
        b = n % 128
        n //= 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def packet(kind, body):
    return bytes([kind]) + remaining(len(body)) + body


def closed_within(s, seconds):
    s.settimeout(0.2)
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if s.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def row(case, result):
    print(f"| {case} | {result} |", flush=True)


def main():
    print("| abuse case | result |")
    print("|---|---|")
    h = Hearth(http_header_timeout_ms=10000, mqtt_packet_timeout_ms=30000)
    try:
        work = h.dir
        # 4. One 64 KiB publish of [1,1,...]: one letter, growth under 1 MB.
        ones = os.path.join(work, "ones.json")
        with open(ones, "w") as f:
            f.write("[" + ",".join(["1"] * 32767) + "]")
        h.drained()
        before = folder_bytes(os.path.join(work, "data"))
        publish(h.mqtt, "hearth/h1/s1", ones)
        time.sleep(2)
        letters = h.json("/api/v1/dlq")
        after = folder_bytes(os.path.join(work, "data"))
        row("one 64 KiB MQTT publish of `[1,1,…]` (32,767 readings)",
            f"{len(letters)} dead letter ({letters[0]['reason']}); data folder +{(after - before) / 1e6:.2f} MB")

        # POST /events with a 1 MiB array.
        item = b'{"house_id":"h1","sensor_id":"s1","kind":"power","value":1},'
        body = b"[" + item * ((1024 * 1024 - 2) // len(item))
        body = body[:-1] + b"]"
        status, answer = h.request("POST", "/api/v1/events", body)
        row(f"`POST /events` with a {len(body) / 1048576:.2f} MiB array",
            f"HTTP {status}, {len(answer)}-byte answer, {len(h.json('/api/v1/dlq')) - len(letters)} new dead letters")

        # 6. 300 half-sent HTTP requests.
        conns = []
        t0 = time.time()
        for _ in range(300):
            c = socket.create_connection(("127.0.0.1", h.api))
            c.sendall(b"GET /api/v1/houses HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            conns.append(c)
        serving = h.get("/api/v1/houses")[0]
        last = 0.0
        for c in conns:
            if closed_within(c, 30):
                last = time.time() - t0
        closed = sum(1 for c in conns if c.fileno() != -1)
        row("300 connections sending half a request (header timeout 10 s)",
            f"all {closed} closed {last:.1f} s after opening; other requests answered meanwhile (HTTP {serving})")
        for c in conns:
            c.close()

        # 6. MQTT keep-alive 0 and half of a PUBLISH; a 1 MiB one.
        for size, case in [(100 * 1024, "half of a 100 KiB PUBLISH (packet timeout 30 s)"),
                           (1024 * 1024, "a 1 MiB PUBLISH (past `max_payload_bytes` + 64 KiB)")]:
            s, code = mqtt_connect(h.mqtt, "half", keep_alive=0)
            topic = b"hearth/h1/s1"
            body = struct.pack("!H", len(topic)) + topic + b"x" * (size - 100)
            whole = packet(0x30, body)
            t0 = time.time()
            s.sendall(whole[: len(whole) // 2])
            closed = closed_within(s, 60)
            row(f"MQTT client with keep-alive 0 sending {case}",
                f"{'closed' if closed else 'still open'} after {time.time() - t0:.1f} s")
            s.close()

        # 6. A million subscription filters in one session.
        s, code = mqtt_connect(h.mqtt, "filters")
        granted = 0
        sent = 0
        pkid = 1
        t0 = time.time()
        while sent < 1_000_000 and time.time() - t0 < 120:
            body = struct.pack("!H", pkid)
            for i in range(1000):
                f = f"hearth/h{sent + i}/#".encode()
                body += struct.pack("!H", len(f)) + f + b"\x00"
            s.sendall(packet(0x82, body))
            buf = b""
            while len(buf) < 4 + 1000:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            granted += sum(1 for b in buf[-1000:] if b == 0)
            sent += 1000
            pkid = pkid % 65535 + 1
        row(f"{sent:,} subscription filters in one session (cap 128)", f"{granted} granted, the rest refused (SUBACK 0x80)")
        s.close()

        # 6. A subscriber that does not read, while 400 MB go by.
        s, code = mqtt_connect(h.mqtt, "sleeper")
        f = b"#"
        s.sendall(packet(0x82, struct.pack("!H", 1) + struct.pack("!H", len(f)) + f + b"\x00"))
        s.recv(5)
        pub, _ = mqtt_connect(h.mqtt, "flooder")
        before = rss_kb(h.proc.pid)
        peak = before
        topic = b"other/topic"
        message = packet(0x30, struct.pack("!H", len(topic)) + topic + b"y" * 40_000)
        for i in range(10_000):
            pub.sendall(message)
            if i % 100 == 0:
                peak = max(peak, rss_kb(h.proc.pid))
        peak = max(peak, rss_kb(h.proc.pid))
        # What the sleeper was sent before it was dropped sits in its socket: read it to the end.
        s.settimeout(30)
        got = 0
        dropped = False
        try:
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    dropped = True
                    break
                got += len(chunk)
        except OSError:
            dropped = True
        row("a subscriber to `#` that never reads while 400 MB are published (buffer 4 MiB)",
            f"{'dropped' if dropped else 'NOT dropped'} after {got / 1e6:.0f} MB reached its socket; "
            f"hearth's RSS {before / 1024:.0f} MB → peak {peak / 1024:.0f} MB")
        pub.close()
        s.close()

        # 5. 20,000 kinds on one sensor; another house's read meanwhile.
        h.request("POST", "/api/v1/events", json.dumps(
            {"house_id": "other", "sensor_id": "s", "kind": "power", "value": 1}).encode())
        for chunk in range(20):
            readings = [{"house_id": "h1", "sensor_id": "wide", "kind": f"k{chunk * 1000 + i}", "value": 1}
                        for i in range(1000)]
            h.request("POST", "/api/v1/events", json.dumps(readings).encode())
        h.drained()
        t0 = time.time()
        sensors = h.json("/api/v1/houses/h1/sensors")
        wide = next(s for s in sensors if s["sensor_id"] == "wide")
        heavy = time.time() - t0
        times = []
        for _ in range(20):
            t0 = time.time()
            h.get("/api/v1/houses/other/sensors")
            times.append(time.time() - t0)
        times.sort()
        row("20,000 kinds sent for one sensor (cap 64)",
            f"{len(wide['kinds'])} kinds kept, the rest dead-lettered `too_many_kinds`; its house's listing {heavy * 1000:.0f} ms, "
            f"another house's {times[10] * 1000:.1f} ms (median of 20)")

        # 7. Token revocation.
        token = h.hearth("token", "create", "--house", "h1").stdout.strip()
        tid = json.loads(h.hearth("token", "list", "--json").stdout)[0]["id"]
        assert h.get("/api/v1/houses", token)[0] == 200
        h.hearth("token", "revoke", tid)
        t0 = time.time()
        while h.get("/api/v1/houses", token)[0] != 401 and time.time() - t0 < 10:
            time.sleep(0.05)
        row("a house token revoked with `hearth token revoke`", f"refused {time.time() - t0:.2f} s later")

        # 8. Files.
        data = os.path.join(work, "data")
        modes = {n: oct(os.stat(os.path.join(data, n)).st_mode & 0o777) for n in os.listdir(data)
                 if n.startswith("hearth.sqlite3") or n == "admin_token"}
        row("the data folder and its files", f"folder {oct(os.stat(data).st_mode & 0o777)}; " +
            ", ".join(f"{k} {v}" for k, v in sorted(modes.items())))
    finally:
        h.stop()


if __name__ == "__main__":
    main()
