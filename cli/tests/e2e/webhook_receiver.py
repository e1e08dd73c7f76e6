"""A webhook receiver for the end-to-end tests, verifying with the `standardwebhooks` package.

Usage: webhook_receiver.py [PORT]   (0 or nothing: any free port)

Prints {"ready": true, "port": N} once listening, then one JSON line per request received:
{"endpoint", "headers", "body", "verified": [bool per secret], "answered": status}. An endpoint is the
last part of the path; what it answers depends on the path:

  /ok/NAME          204
  /fail/N/NAME      500 to the first N requests (with a body), then 204
  /status/S/NAME    S every time (410, 404, 302, 429 with Retry-After: 1, ...)
  /hang/NAME        never answers (the request is held until the process ends)
  /after/K/NAME     204 to the first K requests, then never answers
  /slow/MS/N/NAME   the first N requests: reported on arrival (answered null), then 204 after MS
                    milliseconds (reported again); then 204 at once

POST /control {"endpoint": NAME, "secrets": [...]} sets the secrets NAME's requests are verified with;
POST /verify {"endpoint": NAME, "body": ..., "headers": {...}} verifies a request given in JSON (a
forged one, say) and answers {"verified": [bool per secret]}. Standard library HTTP server otherwise.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

SECRETS = {}
COUNTS = {}
LOCK = threading.Lock()
OUT = threading.Lock()


def emit(obj):
    with OUT:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def verify(endpoint, body, headers):
    with LOCK:
        secrets = list(SECRETS.get(endpoint, []))
    results = []
    for s in secrets:
        try:
            Webhook(s).verify(body, headers)
            results.append(True)
        except WebhookVerificationError:
            results.append(False)
    return results


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        parts = [p for p in self.path.split("/") if p]
        if parts == ["control"]:
            req = json.loads(body)
            with LOCK:
                SECRETS[req["endpoint"]] = req["secrets"]
            return self.answer(200, b"{}")
        if parts == ["verify"]:
            req = json.loads(body)
            ok = verify(req["endpoint"], req["body"].encode(), req["headers"])
            return self.answer(200, json.dumps({"verified": ok}).encode())
        endpoint = parts[-1] if parts else ""
        headers = {k.lower(): v for k, v in self.headers.items()}
        with LOCK:
            COUNTS[self.path] = COUNTS.get(self.path, 0) + 1
            n = COUNTS[self.path]
        status, extra, reply = 204, (), b""
        if parts[0] == "fail" and n <= int(parts[1]):
            status, reply = 500, b"receiver says no"
        elif parts[0] == "status":
            status = int(parts[1])
            if status == 429:
                extra = (("Retry-After", "1"),)
            if 300 <= status < 400:
                extra = (("Location", "http://127.0.0.1:1/elsewhere"),)
        elif parts[0] == "slow" and n <= int(parts[2]):
            emit({"endpoint": endpoint, "headers": headers, "body": body.decode(), "verified": verify(endpoint, body, headers), "answered": None})
            time.sleep(int(parts[1]) / 1000)
        elif parts[0] == "hang" or (parts[0] == "after" and n > int(parts[1])):
            emit({"endpoint": endpoint, "headers": headers, "body": body.decode(), "verified": verify(endpoint, body, headers), "answered": None})
            time.sleep(3600)
            return
        emit({"endpoint": endpoint, "headers": headers, "body": body.decode(), "verified": verify(endpoint, body, headers), "answered": status})
        self.answer(status, reply, extra)


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    emit({"ready": True, "port": server.server_address[1]})
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
