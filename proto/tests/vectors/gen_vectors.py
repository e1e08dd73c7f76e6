#!/usr/bin/env python3
"""Writes libsodium.json: test vectors computed by libsodium itself (through PyNaCl).

Run with Debian's python3-nacl:  /usr/bin/python3 gen_vectors.py > libsodium.json
Inputs are derived from SHA-256 of fixed labels, so the output is reproducible.
"""
import hashlib
import json

import nacl
from nacl.public import Box, PrivateKey
from nacl.secret import SecretBox
from nacl.signing import SigningKey


def det(label: str, n: int) -> bytes:
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}/{i}".encode()).digest()
        i += 1
    return out[:n]


MESSAGES = [b"", b"hello", "héllo, ünïcode ✓".encode(), det("long-message", 1000)]

vectors = {"generator": "PyNaCl " + nacl.__version__ + " (libsodium)", "sign": [], "box": [], "secretbox": []}

for i in range(3):
    seed = det(f"sign-seed-{i}", 32)
    sk = SigningKey(seed)
    for m in MESSAGES:
        vectors["sign"].append({
            "seed": seed.hex(),
            "public": sk.verify_key.encode().hex(),
            "message": m.hex(),
            "signature": sk.sign(m).signature.hex(),
        })

for i in range(3):
    a = PrivateKey(det(f"box-sender-{i}", 32))
    b = PrivateKey(det(f"box-recipient-{i}", 32))
    for j, m in enumerate(MESSAGES):
        nonce = det(f"box-nonce-{i}-{j}", 24)
        ct = Box(a, b.public_key).encrypt(m, nonce).ciphertext
        vectors["box"].append({
            "sender_secret": bytes(a).hex(),
            "sender_public": bytes(a.public_key).hex(),
            "recipient_secret": bytes(b).hex(),
            "recipient_public": bytes(b.public_key).hex(),
            "nonce": nonce.hex(),
            "message": m.hex(),
            "ciphertext": ct.hex(),
        })

for i in range(3):
    key = det(f"secretbox-key-{i}", 32)
    for j, m in enumerate(MESSAGES):
        nonce = det(f"secretbox-nonce-{i}-{j}", 24)
        ct = SecretBox(key).encrypt(m, nonce).ciphertext
        vectors["secretbox"].append({"key": key.hex(), "nonce": nonce.hex(), "message": m.hex(), "ciphertext": ct.hex()})

print(json.dumps(vectors, indent=1))
