"""File encryption (docs/PROTOCOL.md E15), from the spec alone: ChaCha20-Poly1305 per 64 KiB
chunk, the STREAM nonce (7 zero bytes, u32 big-endian counter, last-chunk flag), the blob id
as associated data, and SHA-256 of the plaintext."""

import hashlib
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

CHUNK = 65_536
TAG = 16


class FileError(Exception):
    """A blob that does not open into the file the message describes."""


def chunk_count(size: int) -> int:
    return max(1, -(-size // CHUNK))


def sealed_length(size: int) -> int:
    return size + TAG * chunk_count(size)


def nonce(i: int, last: bool) -> bytes:
    return bytes(7) + struct.pack(">I", i) + (b"\x01" if last else b"\x00")


def seal_file(key: bytes, blob: bytes, plain: bytes) -> bytes:
    aead = ChaCha20Poly1305(key)
    n = chunk_count(len(plain))
    return b"".join(aead.encrypt(nonce(i, i == n - 1), plain[i * CHUNK:(i + 1) * CHUNK], blob)
                    for i in range(n))


def open_file(key: bytes, blob: bytes, size: int, sha256: bytes, sealed: bytes) -> bytes:
    if len(sealed) != sealed_length(size):
        raise FileError(f"a blob of {len(sealed)} bytes for a file of {size}")
    aead = ChaCha20Poly1305(key)
    n = chunk_count(size)
    out, at = [], 0
    for i in range(n):
        plain_len = min(CHUNK, size - i * CHUNK)
        piece = sealed[at:at + plain_len + TAG]
        at += plain_len + TAG
        try:
            out.append(aead.decrypt(nonce(i, i == n - 1), piece, blob))
        except InvalidTag:
            raise FileError(f"chunk {i} does not open") from None
    plain = b"".join(out)
    if hashlib.sha256(plain).digest() != sha256:
        raise FileError("the SHA-256 of the file differs from the message's")
    return plain
