"""Client-side crypto of devices for the interop client, from docs/PROTOCOL.md only.

Identity keys and signed prekeys (part II, E2/E3) and linking a device (E13): the code's
secret, SPAKE2 (PyPI `spake2==0.9`), the key schedule and confirmations, the payload. No
Double Ratchet: the interop client's message bodies are opaque bytes.
"""

import hashlib
import hmac
import re
import secrets
import struct

import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from spake2 import SPAKE2_A, SPAKE2_B

SIGNED_PREKEY_LABEL = b"SFC signed prekey v1"          # E3.2
LAST_RESORT_LABEL = b"SFC last-resort prekey v1"
PAKE_LEN = 33                                           # E13.2
MAX_SEALED_PAYLOAD = 60_000                             # E13.4
MAX_CONTACTS = 500
USERNAME = re.compile(r"[a-z0-9_.-]{3,32}")


def raw_public(key) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# --------------------------------------------------------------------------- keys (E2, E3)

class Identity:
    """An account's Ed25519 identity (E2.1): the 32-byte seed and its public key."""

    def __init__(self, seed: bytes = None):
        self.seed = seed if seed is not None else secrets.token_bytes(32)
        self._key = Ed25519PrivateKey.from_private_bytes(self.seed)
        self.public = raw_public(self._key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def signed_prekey(identity: Identity, label: bytes, key_id: int) -> dict:
    """A SignedPrekey of 5.1: a fresh X25519 public key signed over label ‖ u32be(id) ‖ key.
    The secret is dropped: the interop client never opens envelopes."""
    public = raw_public(X25519PrivateKey.generate())
    return {"id": key_id, "key": public,
            "signature": identity.sign(label + struct.pack(">I", key_id) + public)}


def device_keys(identity: Identity, one_time: int, with_identity: bool) -> dict:
    """The fields of a device's first `publish_keys` (5.1). Ids as E3.1 suggests: the
    last-resort key 1 and one-time keys 2, 3, … (one id space); the signed prekey 1 (its own)."""
    fields = {
        "signed_prekey": signed_prekey(identity, SIGNED_PREKEY_LABEL, 1),
        "last_resort": signed_prekey(identity, LAST_RESORT_LABEL, 1),
        "one_time_prekeys": [{"id": 2 + i, "key": raw_public(X25519PrivateKey.generate())}
                             for i in range(one_time)],
    }
    if with_identity:
        fields["identity_key"] = identity.public
    return fields


def verify_signed_prekey(identity_key: bytes, prekey: dict, label: bytes) -> bool:
    """E3.2's check, as an initiator makes it on every bundle."""
    try:
        Ed25519PublicKey.from_public_bytes(identity_key).verify(
            prekey["signature"], label + struct.pack(">I", prekey["id"]) + prekey["key"])
        return True
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return False


# --------------------------------------------------------------------------- linking (E13)

class LinkError(Exception):
    """A link fails (E13.5); the variant is the message."""


def draw_secret() -> int:
    """E13.1: 4 CSPRNG bytes big-endian, redrawn if ≥ 4,294,000,000, modulo 10^6."""
    while True:
        value = int.from_bytes(secrets.token_bytes(4), "big")
        if value < 4_294_000_000:
            return value % 1_000_000


def pake_password(secret: int) -> bytes:
    """The SPAKE2 password: the secret alone as 6 ASCII digits (E13.1)."""
    return b"%06d" % secret


def link_ids(username: str) -> "tuple[bytes, bytes]":
    name = username.encode()
    return b"SFC link existing device " + name, b"SFC link new device " + name


def spake_existing(username: str, secret: int) -> SPAKE2_A:
    """E is SPAKE2 side A; its start() is pake_E (0x41 ‖ 32 bytes)."""
    id_a, id_b = link_ids(username)
    return SPAKE2_A(pake_password(secret), idA=id_a, idB=id_b)


def spake_new(username: str, secret: int) -> SPAKE2_B:
    """N is SPAKE2 side B; its start() is pake_N (0x42 ‖ 32 bytes)."""
    id_a, id_b = link_ids(username)
    return SPAKE2_B(pake_password(secret), idA=id_a, idB=id_b)


def finish_pake(side, received, first_byte: int) -> bytes:
    """K from the other side's message; a message not of 33 bytes starting with the other
    side's byte, or not a curve point, is `MalformedMessage` (E13.2)."""
    if not isinstance(received, bytes) or len(received) != PAKE_LEN or received[0] != first_byte:
        raise LinkError("MalformedMessage")
    try:
        return side.finish(received)
    except Exception as e:  # noqa: BLE001 - python-spake2 raises several types for bad points
        raise LinkError(f"MalformedMessage ({type(e).__name__})") from e


class LinkKeys:
    """E13.3: the transcript T, both confirmations and the payload key."""

    def __init__(self, key: bytes, username: str, slot: int, pake_e: bytes, pake_n: bytes):
        name = username.encode()
        self.transcript = (b"SFC link v1" + struct.pack(">H", len(name)) + name
                           + struct.pack(">H", slot) + pake_e + pake_n)
        okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=b"\0" * 32,
                   info=self.transcript).derive(key)
        self.c_n = hmac.new(okm[:32], b"SFC link confirm new device" + self.transcript,
                            hashlib.sha256).digest()
        self.c_e = hmac.new(okm[32:64], b"SFC link confirm existing device" + self.transcript,
                            hashlib.sha256).digest()
        self.k_payload = okm[64:]

    def c_n_verifies(self, received) -> bool:
        return isinstance(received, bytes) and len(received) == 32 and \
            hmac.compare_digest(received, self.c_n)

    def c_e_verifies(self, received) -> bool:
        return isinstance(received, bytes) and len(received) == 32 and \
            hmac.compare_digest(received, self.c_e)

    def _aad(self) -> bytes:
        return b"SFC link payload v1" + self.c_n + self.c_e

    def seal(self, payload: bytes) -> bytes:
        sealed = ChaCha20Poly1305(self.k_payload).encrypt(b"\0" * 12, payload, self._aad())
        if len(sealed) > MAX_SEALED_PAYLOAD:
            raise LinkError("PayloadTooLarge")
        return sealed

    def open(self, sealed: bytes) -> bytes:
        if len(sealed) > MAX_SEALED_PAYLOAD:
            raise LinkError("PayloadTooLarge")
        try:
            return ChaCha20Poly1305(self.k_payload).decrypt(b"\0" * 12, sealed, self._aad())
        except InvalidTag as e:
            raise LinkError("PayloadDecryption") from e


def encode_payload(username: str, identity_seed: bytes, contacts: list) -> bytes:
    """LinkPayload (E13.4), keys in the listed order; contacts are
    {username, identity_key, verified} maps, in that key order too."""
    return msgpack.packb({
        "version": 1,
        "username": username,
        "identity_seed": identity_seed,
        "contacts": [{"username": c["username"], "identity_key": c["identity_key"],
                      "verified": c["verified"]} for c in contacts],
    }, use_bin_type=True)


def _strict_map(pairs):
    keys = [k for k, _ in pairs]
    if not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise LinkError("MalformedPayload (keys not distinct strings)")
    return dict(pairs)


def _exact_keys(value, keys: set, what: str) -> dict:
    if not isinstance(value, dict) or set(value) != keys:
        raise LinkError(f"MalformedPayload ({what} keys)")
    if any(v is None for v in value.values()):
        raise LinkError(f"MalformedPayload ({what}: nil)")
    return value


def decode_payload(data: bytes, account: str) -> dict:
    """The strict decoding of E13.4, for the account N is linking."""
    unpacker = msgpack.Unpacker(raw=False, object_pairs_hook=_strict_map, strict_map_key=False)
    unpacker.feed(data)
    try:
        value = unpacker.unpack()
    except (msgpack.OutOfData, ValueError) as e:
        raise LinkError("MalformedPayload (not one MessagePack value)") from e
    if unpacker.tell() != len(data):
        raise LinkError("MalformedPayload (bytes after the map)")
    payload = _exact_keys(value, {"version", "username", "identity_seed", "contacts"}, "payload")
    if type(payload["version"]) is not int or payload["version"] != 1:
        raise LinkError("MalformedPayload (version)")
    if not isinstance(payload["username"], str) or not USERNAME.fullmatch(payload["username"]):
        raise LinkError("MalformedPayload (username)")
    if payload["username"] != account:
        raise LinkError("WrongAccount")
    if not isinstance(payload["identity_seed"], bytes) or len(payload["identity_seed"]) != 32:
        raise LinkError("MalformedPayload (identity_seed)")
    contacts = payload["contacts"]
    if not isinstance(contacts, list):
        raise LinkError("MalformedPayload (contacts)")
    if len(contacts) > MAX_CONTACTS:
        raise LinkError("TooManyContacts")
    seen = set()
    for contact in contacts:
        _exact_keys(contact, {"username", "identity_key", "verified"}, "contact")
        name = contact["username"]
        if not isinstance(name, str) or not USERNAME.fullmatch(name) or name == account \
                or name in seen:
            raise LinkError("MalformedPayload (contact username)")
        seen.add(name)
        key = contact["identity_key"]
        if not isinstance(key, bytes) or len(key) != 32:
            raise LinkError("MalformedPayload (contact identity_key)")
        try:  # E2.1's canonical/small-order rules are not checked here (see the report)
            Ed25519PublicKey.from_public_bytes(key)
        except ValueError as e:
            raise LinkError("MalformedPayload (contact identity_key)") from e
        if not isinstance(contact["verified"], bool):
            raise LinkError("MalformedPayload (contact verified)")
    return payload
