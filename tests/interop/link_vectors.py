#!/usr/bin/env python3
"""Reproduces the E13 (linking a device) test vectors of docs/PROTOCOL.md from the spec alone.

Uses the E13 code the interop client links devices with (devices_crypto.py), so the vectors
check what runs against the server. Needs tests/interop/requirements.txt (scripts/interop.sh
runs it first). Prints every value and exits 1 if one differs from the table in PROTOCOL.md:

    python3 -m venv /tmp/v && /tmp/v/bin/pip install -r tests/interop/requirements.txt
    /tmp/v/bin/python tests/interop/link_vectors.py
"""

import hashlib
import sys

import spake2.ed25519_basic as ed25519_basic

from devices_crypto import (
    Identity,
    LinkKeys,
    decode_payload,
    encode_payload,
    link_ids,
    spake_existing,
    spake_new,
)

EXPECTED = {
    "pake_E": "418c6a685182c16ac54a722028c47bb257fab457ef982639c3f14228a0d3d11392",
    "pake_N": "4281b73789a17781eacb741aa6774ddcc9b06798d53de0e3db7cd596e52309b58f",
    "K": "28525ffff102814c6ca373ee965c35de0f47ad4e3576e2dc796068438d0e80cd",
    "k_payload": "70ff30a5419eaa8ab2e98015168a8050cfcfbc5f01a4345068755f933905af0b",
    "c_N": "4ee473617673b84ceff364cad0799c8c1776b064df412f81c265903d53e86fe3",
    "c_E": "b99ac9484b1dd126c79f744d43d40e278e25e6a515a9640c19fad8b58a9db008",
    "sealed_sha256": "9bb2701084c110757062ea5d177eb43020345bd9b3832ec56488adae4c048a38",
    "payload": "84a776657273696f6e01a8757365726e616d65a5616c696365ad6964656e7469"
               "74795f73656564c4206d2e9e95c07209ee5377ac43611c9a0109e4ff0fcce397"
               "99ce3891d84281b973a8636f6e74616374739183a8757365726e616d65a3626f"
               "62ac6964656e746974795f6b6579c42050df62cf8fba70c781c3932cc1cf74cc"
               "ef2020aa331b50bbd2a5230372ad3a7fa87665726966696564c3",
    "idA": "534643206c696e6b206578697374696e672064657669636520616c696365",
    "idB": "534643206c696e6b206e65772064657669636520616c696365",
    "alice_identity_key": "def59ecff205f40e54b0df7d39e9cd92d5ee6e3365fa2e42215a25489f63fb83",
}


def scalar(first):
    """The vectors' x (first = 0x01) and y (first = 0x21): 32 bytes little-endian."""
    return int.from_bytes(bytes(first + i for i in range(31)) + b"\0", "little")


def main():
    user, slot, secret = "alice", 4821, 730195
    ed25519_basic.random_scalar = lambda _entropy: scalar(0x01)
    side_a = spake_existing(user, secret)
    pake_e = side_a.start()
    ed25519_basic.random_scalar = lambda _entropy: scalar(0x21)
    side_b = spake_new(user, secret)
    pake_n = side_b.start()
    key = side_a.finish(pake_n)
    assert key == side_b.finish(pake_e)

    keys = LinkKeys(key, user, slot, pake_e, pake_n)
    alice = Identity(hashlib.sha256(b"E13 alice identity").digest())
    bob = Identity(hashlib.sha256(b"E13 bob identity").digest())
    payload = encode_payload(user, alice.seed,
                             [{"username": "bob", "identity_key": bob.public, "verified": True}])
    sealed = keys.seal(payload)
    assert decode_payload(keys.open(sealed), user)["identity_seed"] == alice.seed
    id_a, id_b = link_ids(user)

    got = {"pake_E": pake_e, "pake_N": pake_n, "K": key, "k_payload": keys.k_payload,
           "c_N": keys.c_n, "c_E": keys.c_e, "sealed_sha256": hashlib.sha256(sealed).digest(),
           "payload": payload, "idA": id_a, "idB": id_b, "alice_identity_key": alice.public}
    print(f"transcript = {keys.transcript.hex()}\nsealed = {sealed.hex()}")
    ok = True
    for name, value in got.items():
        same = value.hex() == EXPECTED[name]
        ok &= same
        print(f"{name} = {value.hex()} {'ok' if same else 'DIFFERS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
