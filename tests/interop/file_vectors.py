#!/usr/bin/env python3
"""Reproduces the E15 file-encryption vectors of docs/PROTOCOL.md (E15.5) with files_crypto.py,
an implementation written from E15's text alone, and checks the document shows these values.

Usage: python3 file_vectors.py [path/to/PROTOCOL.md]
"""

import hashlib
import pathlib
import sys

import msgpack

from files_crypto import CHUNK, TAG, chunk_count, open_file, seal_file, sealed_length

KEY = bytes(range(32))
BLOB = bytes([0xB1]) * 16


def plaintext(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def main():
    doc_path = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else
                            pathlib.Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md")
    doc = doc_path.read_text()
    section = doc.split("### E15.5 Test vectors", 1)[-1]
    missing = []
    for size in (0, 1, 65_536, 65_537):
        plain = plaintext(size)
        sealed = seal_file(KEY, BLOB, plain)
        digest = hashlib.sha256(plain).digest()
        assert len(sealed) == sealed_length(size)
        assert open_file(KEY, BLOB, size, digest, sealed) == plain
        wanted = [hashlib.sha256(plain).hexdigest()]
        at = 0
        for i in range(chunk_count(size)):
            piece = min(CHUNK, size - i * CHUNK) + TAG
            wanted.append(hashlib.sha256(sealed[at:at + piece]).hexdigest())
            at += piece
        if size <= 1:
            wanted.append(sealed.hex())
        missing += [(size, w) for w in wanted if w not in section]
    ref = {"blob": BLOB, "key": KEY, "sha256": hashlib.sha256(plaintext(65_537)).digest(),
           "size": 65_537, "name": "report.pdf", "type": "application/pdf", "chunk": CHUNK}
    packed = msgpack.packb(ref, use_bin_type=True).hex()
    shown = "".join(section.split("```")[1].split()) if "```" in section else ""
    if packed != shown:
        missing.append(("file message", packed))
    if missing:
        for what in missing:
            print(f"E15.5 lacks {what}", file=sys.stderr)
        sys.exit(1)
    print("E15 vectors: 4 files and the file message reproduced")


if __name__ == "__main__":
    main()
