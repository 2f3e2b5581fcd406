"""Checks F1–F5: blobs (docs/PROTOCOL.md 5.6) sealed as E15 says, against the real server,
from the spec alone.

F1 alice seals a file and uploads it, cut at half and resumed from the server's `held`; F2 bob
downloads it (whole, then from an offset) and opens it; F3 a user it does not name cannot fetch
it; F4 refusals before a body is sent (too large, unknown reader, a wrong offset); F5 bob's
`ack_blob` deletes it.
"""

import contextlib
import hashlib
import secrets

from files_crypto import FileError, open_file, seal_file, sealed_length
from sfc_wire import connection, is_error

FILE_SIZE = 150_000            # three chunks: 65,536 + 65,536 + 18,928 bytes
CUT = 70_000                   # where the first upload stream ends (inside chunk 1)
MAX_BLOB = 104_883_200         # the default `max_blob_bytes` (8.)


class Skip(Exception):
    """A check this one depends on failed; the rest of the flow cannot run."""


class Flow:
    def __init__(self, args, cfg, r, stack):
        self.args, self.cfg, self.r, self.stack = args, cfg, r, stack
        tag = secrets.token_hex(5)
        self.alice, self.bob, self.carol = "fa_" + tag, "fb_" + tag, "fc_" + tag
        self.password = "pw-" + secrets.token_urlsafe(16)
        self.plain = secrets.token_bytes(FILE_SIZE)
        self.key, self.blob = secrets.token_bytes(32), secrets.token_bytes(16)
        self.sealed = seal_file(self.key, self.blob, self.plain)
        self.sha256 = hashlib.sha256(self.plain).digest()
        self.a = self.b = self.c = None

    def check(self, name, cond, detail=""):
        return self.r.check(name, cond, detail)

    def need(self, name, cond, detail=""):
        if not self.check(name, cond, detail):
            raise Skip(name)

    async def account(self, name):
        c = await self.stack.enter_async_context(connection(self.args, self.cfg))
        c.open_control_stream()
        rep = await c.request("hello", version=1, client="sfc-interop-py/1")
        if rep.get("type") != "hello":
            raise Skip(f"hello refused: {rep!r}")
        rep = await c.request("signup", username=name, password=self.password)
        self.need(f"F0 signup {name}", rep.get("type") == "session", rep)
        return c


def of_blob(blob, kind):
    return lambda ev: ev.get("type") == kind and ev.get("blob") == blob


async def f1_upload(f: Flow):
    f.a = await f.account(f.alice)
    f.b = await f.account(f.bob)
    f.c = await f.account(f.carol)
    length = sealed_length(FILE_SIZE)
    f.check("F1.1 the sealed file is size + 16 per chunk", len(f.sealed) == length == 150_048,
            len(f.sealed))
    rep = await f.a.request("upload_blob", blob=f.blob, length=length, readers=[f.bob])
    f.need("F1.2 upload_blob -> blob_upload held 0",
           rep.get("type") == "blob_upload" and rep.get("blob") == f.blob and rep.get("held") == 0,
           rep)
    f.a.send_upload(f.blob, 0, f.sealed[:CUT])
    ev = await f.a.wait_event(of_blob(f.blob, "upload_failed"))
    held = ev.get("held")
    f.need("F1.3 an upload stream ending early -> upload_failed truncated_frame, held kept",
           ev.get("code") == "truncated_frame" and isinstance(held, int) and 0 < held <= CUT, ev)
    rep = await f.a.request("upload_blob", blob=f.blob, length=length, readers=[f.bob])
    f.need("F1.4 upload_blob again says how much is held",
           rep.get("type") == "blob_upload" and rep.get("held") == held, rep)
    f.a.send_upload(f.blob, held, f.sealed[held:])
    ev = await f.a.wait_event(of_blob(f.blob, "blob_stored"))
    f.need("F1.5 the rest from `held` -> blob_stored with the whole length",
           ev.get("length") == length, ev)
    rep = await f.a.request("upload_blob", blob=f.blob, length=length, readers=[f.bob])
    f.check("F1.6 a complete blob reports held == length",
            rep.get("type") == "blob_upload" and rep.get("held") == length, rep)


async def f2_download(f: Flow):
    rep = await f.b.request("download_blob", blob=f.blob, offset=0)
    f.need("F2.1 bob: download_blob -> blob_download",
           rep.get("type") == "blob_download" and rep.get("length") == len(f.sealed)
           and rep.get("offset") == 0, rep)
    header, data = await f.b.wait_blob()
    f.need("F2.2 a blob stream with the blob's header and every byte",
           header.get("blob") == f.blob and header.get("offset") == 0
           and header.get("length") == len(f.sealed) and data == f.sealed, header)
    try:
        plain = open_file(f.key, f.blob, FILE_SIZE, f.sha256, data)
        f.check("F2.3 the blob opens (E15) into the file, SHA-256 matching", plain == f.plain)
    except FileError as e:
        f.check("F2.3 the blob opens (E15) into the file, SHA-256 matching", False, e)
    swapped = bytearray(data)
    swapped[0:65_552], swapped[65_552:131_104] = data[65_552:131_104], data[0:65_552]
    try:
        open_file(f.key, f.blob, FILE_SIZE, f.sha256, bytes(swapped))
        f.check("F2.4 two chunks swapped do not open", False, "opened")
    except FileError:
        f.check("F2.4 two chunks swapped do not open", True)
    offset = 100_000
    rep = await f.b.request("download_blob", blob=f.blob, offset=offset)
    header, rest = await f.b.wait_blob()
    f.check("F2.5 a download from an offset resumes there",
            rep.get("type") == "blob_download" and header.get("offset") == offset
            and rest == f.sealed[offset:], (rep, header))


async def f3_not_a_reader(f: Flow):
    rep = await f.c.request("download_blob", blob=f.blob, offset=0)
    f.check("F3.1 a user the blob does not name -> unknown_blob", is_error(rep, "unknown_blob"), rep)
    rep = await f.c.request("download_blob", blob=secrets.token_bytes(16), offset=0)
    f.check("F3.2 a blob that does not exist -> the same unknown_blob",
            is_error(rep, "unknown_blob"), rep)
    rep = await f.c.request("upload_blob", blob=f.blob, length=len(f.sealed), readers=[f.bob])
    f.check("F3.3 another user's blob id -> blob_exists", is_error(rep, "blob_exists"), rep)


async def f4_refusals(f: Flow):
    other = secrets.token_bytes(16)
    rep = await f.a.request("upload_blob", blob=other, length=MAX_BLOB + 1, readers=[f.bob])
    f.check("F4.1 a blob over max_blob_bytes -> blob_too_large before any body",
            is_error(rep, "blob_too_large"), rep)
    rep = await f.a.request("upload_blob", blob=other, length=100, readers=["nobody_" + f.bob])
    f.check("F4.2 a reader without an account -> unknown_user", is_error(rep, "unknown_user"), rep)
    rep = await f.a.request("upload_blob", blob=other, length=100, readers=[f.bob])
    f.need("F4.3 a small blob is taken", rep.get("type") == "blob_upload", rep)
    f.a.send_upload(other, 50, bytes(50))
    ev = await f.a.wait_event(of_blob(other, "upload_failed"))
    f.check("F4.4 an upload stream not starting at `held` -> upload_failed bad_offset",
            ev.get("code") == "bad_offset" and ev.get("held") == 0, ev)
    f.a.send_upload(other, 0, bytes(101))
    ev = await f.a.wait_event(of_blob(other, "upload_failed"))
    f.check("F4.5 more bytes than the length -> upload_failed blob_too_large",
            ev.get("code") == "blob_too_large", ev)


async def f5_ack(f: Flow):
    rep = await f.b.request("ack_blob", blob=f.blob)
    f.need("F5.1 bob: ack_blob -> blob_acked", rep.get("type") == "blob_acked"
           and rep.get("blob") == f.blob, rep)
    rep = await f.b.request("download_blob", blob=f.blob, offset=0)
    f.check("F5.2 once every device that must fetch it acknowledged it, the blob is gone",
            is_error(rep, "unknown_blob"), rep)
    rep = await f.b.request("ack_blob", blob=f.blob)
    f.check("F5.3 ack_blob of a deleted blob -> unknown_blob", is_error(rep, "unknown_blob"), rep)


CHECKS = [("F1 upload, cut and resumed", f1_upload),
          ("F2 download and open", f2_download),
          ("F3 only readers fetch", f3_not_a_reader),
          ("F4 refusals", f4_refusals),
          ("F5 acknowledged and deleted", f5_ack)]


async def files_flow(args, cfg, r):
    """Runs F1–F5 in order; a failed prerequisite fails its group and reports the later groups
    as not run (each a FAIL)."""
    async with contextlib.AsyncExitStack() as stack:
        f = Flow(args, cfg, r, stack)
        for n, (name, group) in enumerate(CHECKS):
            try:
                await group(f)
            except Skip:
                stopped = name
            except Exception as e:  # noqa: BLE001 - report everything as a failure
                r.check(name, False, f"{type(e).__name__}: {e}")
                stopped = name
            else:
                continue
            for later, _ in CHECKS[n + 1:]:
                r.check(later, False, f"not run: {stopped} failed")
            return
        errors = {label: c.protocol_error for label, c in
                  (("alice", f.a), ("bob", f.b), ("carol", f.c)) if c.protocol_error is not None}
        r.check("F5.4 no unexpected frames or streams on any of the connections", not errors,
                errors)
