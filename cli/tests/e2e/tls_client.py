"""A TLS client of the broker written by no one here: Python's ssl and the `websockets` package.

    tls_client.py URL --pin sha256:HEX   verify the broker by the certificate's SHA-256, no CA
    tls_client.py URL --ca FILE          verify against a CA file, host name included

Connects to the broker's WebSocket, reads the first frame (the challenge) and also fetches /health
over HTTPS with the same trust; prints one JSON line:
{"fingerprint": "sha256:…", "first_frame": "challenge", "health": "ok"}. Exits 1 with the error on a
refused certificate or a wrong pin.
"""

import argparse
import asyncio
import hashlib
import json
import ssl
import sys
import urllib.request

import websockets


def context(args):
    if args.ca:
        return ssl.create_default_context(cafile=args.ca)
    # Pinned: no CA and no name; the fingerprint is checked after the handshake, before any byte of
    # the protocol is trusted.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def fingerprint(ssl_object):
    return "sha256:" + hashlib.sha256(ssl_object.getpeercert(binary_form=True)).hexdigest()


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--pin")
    parser.add_argument("--ca")
    args = parser.parse_args()
    ctx = context(args)
    endpoint = args.url.rstrip("/") + "/v1/ws"
    async with websockets.connect(endpoint, ssl=ctx, open_timeout=10) as ws:
        seen = fingerprint(ws.transport.get_extra_info("ssl_object"))
        if args.pin and seen != args.pin:
            print(f"pin mismatch: expected {args.pin}, got {seen}", file=sys.stderr)
            sys.exit(1)
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
    health_url = args.url.replace("wss://", "https://", 1).rstrip("/") + "/health"
    with urllib.request.urlopen(health_url, context=ctx, timeout=10) as answer:
        health = json.loads(answer.read())
    print(json.dumps({"fingerprint": seen, "first_frame": first.get("type"), "health": health.get("status")}))


try:
    asyncio.run(main())
except (ssl.SSLError, OSError) as e:
    print(f"refused: {e}", file=sys.stderr)
    sys.exit(1)
