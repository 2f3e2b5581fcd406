#!/usr/bin/env python3
"""Reproduces the E13 (linking a device) test vectors of docs/PROTOCOL.md from the spec alone.

Needs PyPI `spake2==0.9` and `cryptography` (not in requirements.txt yet: the devices interop
section adds them). Prints every value and exits 1 if one differs from the table in PROTOCOL.md:

    python3 -m venv /tmp/v && /tmp/v/bin/pip install spake2==0.9 cryptography
    /tmp/v/bin/python tests/interop/link_vectors.py
"""

import hashlib
import hmac
import sys

import spake2.ed25519_basic as ed25519_basic
from spake2 import SPAKE2_A, SPAKE2_B
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

EXPECTED = {
    "pake_E": "418c6a685182c16ac54a722028c47bb257fab457ef982639c3f14228a0d3d11392",
    "pake_N": "4281b73789a17781eacb741aa6774ddcc9b06798d53de0e3db7cd596e52309b58f",
    "K": "28525ffff102814c6ca373ee965c35de0f47ad4e3576e2dc796068438d0e80cd",
    "k_payload": "70ff30a5419eaa8ab2e98015168a8050cfcfbc5f01a4345068755f933905af0b",
    "c_N": "4ee473617673b84ceff364cad0799c8c1776b064df412f81c265903d53e86fe3",
    "c_E": "b99ac9484b1dd126c79f744d43d40e278e25e6a515a9640c19fad8b58a9db008",
    "sealed_sha256": "9bb2701084c110757062ea5d177eb43020345bd9b3832ec56488adae4c048a38",
}


def scalar(first):
    """The vectors' x (first = 0x01) and y (first = 0x21): 32 bytes little-endian."""
    return int.from_bytes(bytes(first + i for i in range(31)) + b"\0", "little")


def fixstr(text):
    return bytes([0xA0 | len(text)]) + text


def main():
    user, slot, password = b"alice", 4821, b"730195"
    id_a = b"SFC link existing device " + user
    id_b = b"SFC link new device " + user
    ed25519_basic.random_scalar = lambda _entropy: scalar(0x01)
    side_a = SPAKE2_A(password, idA=id_a, idB=id_b)
    pake_e = side_a.start()
    ed25519_basic.random_scalar = lambda _entropy: scalar(0x21)
    side_b = SPAKE2_B(password, idA=id_a, idB=id_b)
    pake_n = side_b.start()
    key = side_a.finish(pake_n)
    assert key == side_b.finish(pake_e)

    transcript = (b"SFC link v1" + len(user).to_bytes(2, "big") + user
                  + slot.to_bytes(2, "big") + pake_e + pake_n)
    okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=b"\0" * 32,
               info=transcript).derive(key)
    c_n = hmac.new(okm[:32], b"SFC link confirm new device" + transcript, hashlib.sha256).digest()
    c_e = hmac.new(okm[32:64], b"SFC link confirm existing device" + transcript,
                   hashlib.sha256).digest()

    seed = hashlib.sha256(b"E13 alice identity").digest()
    bob = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"E13 bob identity").digest())
    bob_key = bob.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    payload = (b"\x84" + fixstr(b"version") + b"\x01" + fixstr(b"username") + fixstr(user)
               + fixstr(b"identity_seed") + b"\xc4\x20" + seed
               + fixstr(b"contacts") + b"\x91"
               + b"\x83" + fixstr(b"username") + fixstr(b"bob")
               + fixstr(b"identity_key") + b"\xc4\x20" + bob_key
               + fixstr(b"verified") + b"\xc3")
    sealed = ChaCha20Poly1305(okm[64:]).encrypt(b"\0" * 12, payload,
                                                b"SFC link payload v1" + c_n + c_e)

    got = {"pake_E": pake_e, "pake_N": pake_n, "K": key, "k_payload": okm[64:],
           "c_N": c_n, "c_E": c_e, "sealed_sha256": hashlib.sha256(sealed).digest()}
    print(f"transcript = {transcript.hex()}\npayload = {payload.hex()}\nsealed = {sealed.hex()}")
    ok = True
    for name, value in got.items():
        same = value.hex() == EXPECTED[name]
        ok &= same
        print(f"{name} = {value.hex()} {'ok' if same else 'DIFFERS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
