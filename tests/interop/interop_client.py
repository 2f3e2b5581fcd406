#!/usr/bin/env python3
"""SecureFastChat (ALPN sfc/1) interop client, written from PROTOCOL.md only.

Usage: python3 interop_client.py --server 127.0.0.1:24433 --ca certs/ca.crt

Runs a fixed sequence of protocol checks, prints one PASS/FAIL line per check and
exits non-zero if any check failed.
"""

import argparse
import asyncio
import ipaddress
import secrets
import ssl
import struct
import sys
import time

import msgpack
from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived, StreamReset

ALPN = "sfc/1"
MAX_FRAME = 65_536          # PROTOCOL.md §2 / §7
REPLY_TIMEOUT = 10.0        # seconds; argon2id hashing can take a moment
CLOSE_NORMAL, CLOSE_SHUTDOWN, CLOSE_PROTOCOL_VIOLATION = 0, 1, 2


class ProtocolError(Exception):
    pass


class ConnectionClosed(Exception):
    def __init__(self, event):
        super().__init__(
            f"connection closed: code={event.error_code} frame_type={event.frame_type} "
            f"reason={event.reason_phrase!r}"
        )
        self.event = event


# --------------------------------------------------------------------------- framing

def encode_frame(obj) -> bytes:
    """length: u32 big-endian, then exactly one MessagePack map (§2)."""
    body = msgpack.packb(obj, use_bin_type=True)  # str -> str, bytes -> bin
    if len(body) > MAX_FRAME:
        raise ValueError("frame body too large")
    return struct.pack(">I", len(body)) + body


def decode_body(body: bytes) -> dict:
    """Decode exactly one MessagePack value; trailing bytes are an error (§2)."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)
    unpacker.feed(body)
    try:
        value = unpacker.unpack()
    except msgpack.OutOfData:
        raise ProtocolError("truncated MessagePack body")
    if unpacker.tell() != len(body):
        raise ProtocolError("bytes after the MessagePack value")
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ProtocolError(f"frame body is not a map with string keys: {value!r}")
    if "type" not in value or not isinstance(value["type"], str):
        raise ProtocolError(f"server frame without string 'type': {value!r}")
    if "id" in value and not (isinstance(value["id"], int) and value["id"] >= 0):
        raise ProtocolError(f"server frame with non-uint 'id': {value!r}")
    return value


class FrameReader:
    """Reassembles frames from control-stream bytes (frames may span packets)."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes):
        self.buf += data
        frames = []
        while len(self.buf) >= 4:
            (length,) = struct.unpack(">I", self.buf[:4])
            if length > MAX_FRAME:  # checked before reading the body (§2)
                raise ProtocolError(f"server sent frame length {length} > {MAX_FRAME}")
            if len(self.buf) < 4 + length:
                break
            body = bytes(self.buf[4:4 + length])
            del self.buf[:4 + length]
            frames.append(decode_body(body))
        return frames


# --------------------------------------------------------------------------- client

class SfcProtocol(QuicConnectionProtocol):
    """One QUIC connection with one control stream (client-initiated bidi)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream_id = None
        self.reader = FrameReader()
        self.next_id = 1
        self.pending = {}                     # id -> Future(reply dict)
        self.conn_frames = asyncio.Queue()    # frames without id (connection-level)
        self.closed = asyncio.get_event_loop().create_future()  # ConnectionTerminated
        self.stream_fin = False
        self.protocol_error = None

    # -- sending
    def open_control_stream(self):
        self.stream_id = self._quic.get_next_available_stream_id(is_unidirectional=False)

    def send_raw(self, data: bytes, end_stream: bool = False):
        if self.stream_id is None:
            self.open_control_stream()
        self._quic.send_stream_data(self.stream_id, data, end_stream=end_stream)
        self.transmit()

    def send_request(self, rtype: str, **fields) -> "tuple[int, asyncio.Future]":
        rid = self.next_id
        self.next_id += 1
        fut = asyncio.get_event_loop().create_future()
        self.pending[rid] = fut
        self.send_raw(encode_frame({"id": rid, "type": rtype, **fields}))
        return rid, fut

    async def request(self, rtype: str, **fields) -> dict:
        _, fut = self.send_request(rtype, **fields)
        return await self.wait_reply(fut)

    async def wait_reply(self, fut) -> dict:
        done, _ = await asyncio.wait({fut, self.closed}, timeout=REPLY_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            return fut.result()
        if self.closed in done:
            raise ConnectionClosed(self.closed.result())
        raise asyncio.TimeoutError("no reply within %.0fs" % REPLY_TIMEOUT)

    async def next_connection_frame(self, timeout=REPLY_TIMEOUT) -> dict:
        return await asyncio.wait_for(self.conn_frames.get(), timeout)

    async def wait_terminated(self, timeout=REPLY_TIMEOUT):
        return await asyncio.wait_for(asyncio.shield(self.closed), timeout)

    # -- receiving
    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived):
            if event.stream_id != self.stream_id:
                self.protocol_error = f"data on unexpected stream {event.stream_id}"
                return
            try:
                frames = self.reader.feed(event.data)
            except ProtocolError as e:
                self.protocol_error = str(e)
                return
            for frame in frames:
                rid = frame.get("id")
                if rid is None:
                    self.conn_frames.put_nowait(frame)
                elif rid in self.pending and not self.pending[rid].done():
                    self.pending.pop(rid).set_result(frame)
                else:
                    self.protocol_error = f"reply with unexpected id: {frame!r}"
            if event.end_stream:
                self.stream_fin = True
                if self.reader.buf:
                    self.protocol_error = "server FIN inside a frame"
        elif isinstance(event, StreamReset):
            self.protocol_error = f"stream {event.stream_id} reset code {event.error_code}"
        elif isinstance(event, ConnectionTerminated):
            if not self.closed.done():
                self.closed.set_result(event)


def make_config(ca_path: str, host: str) -> QuicConfiguration:
    cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
    cfg.verify_mode = ssl.CERT_REQUIRED       # never "accept any certificate"
    cfg.load_verify_locations(cafile=ca_path)
    cfg.server_name = host                     # verified against DNS or IP SAN
    cfg.idle_timeout = 60.0
    return cfg


# --------------------------------------------------------------------------- checks

class Results:
    def __init__(self):
        self.failed = 0
        self.passed = 0

    def check(self, name: str, cond: bool, detail=""):
        if cond:
            self.passed += 1
            print(f"PASS {name}")
        else:
            self.failed += 1
            print(f"FAIL {name}" + (f": {detail}" if detail else ""))
        return cond


def is_error(reply, code):
    return reply.get("type") == "error" and reply.get("code") == code


async def step(results, name, coro):
    """Run one check coroutine; exceptions count as FAIL instead of aborting."""
    try:
        return await coro
    except Exception as e:  # noqa: BLE001 - report everything as a failure
        results.check(name, False, f"{type(e).__name__}: {e}")
        return None


def connection(args, cfg):
    return connect(args.host, args.port, configuration=cfg,
                   create_protocol=SfcProtocol, wait_connected=True)


async def do_hello(r, c, label):
    rep = await c.request("hello", version=1, client="sfc-interop-py/1")
    ok = (rep.get("type") == "hello" and rep.get("version") == 1
          and isinstance(rep.get("server"), str) and rep.get("max_frame") == MAX_FRAME)
    r.check(f"{label}: hello -> hello v1, max_frame {MAX_FRAME}", ok, rep)
    return rep


async def main_flow(args, r: Results):
    cfg = make_config(args.ca, args.host)
    username = "interop_" + secrets.token_hex(6)
    password = "pw-" + secrets.token_urlsafe(16)
    token = None

    # ---- connection 1: account lifecycle ---------------------------------------------
    async with connection(args, cfg) as c:
        c.open_control_stream()
        alpn = c._quic.tls.alpn_negotiated
        r.check("conn1: TLS verified against CA, ALPN sfc/1", alpn == ALPN, alpn)

        await step(r, "hello", do_hello(r, c, "conn1"))

        async def check_username():
            rep = await c.request("check_username", username=username)
            r.check("check_username -> username_status available=true",
                    rep.get("type") == "username_status" and rep.get("available") is True
                    and rep.get("username") == username, rep)
        await step(r, "check_username", check_username())

        async def signup():
            rep = await c.request("signup", username=username, password=password)
            tok = rep.get("token")
            ok = (rep.get("type") == "session" and rep.get("username") == username
                  and isinstance(tok, bytes) and len(tok) == 32
                  and isinstance(rep.get("expires_at"), int) and rep["expires_at"] > time.time())
            r.check("signup -> session (32-byte bin token, future expires_at)", ok, rep)
        await step(r, "signup", signup())

        async def whoami_ok(label):
            rep = await c.request("whoami")
            r.check(f"{label} -> whoami {username}",
                    rep.get("type") == "whoami" and rep.get("username") == username
                    and isinstance(rep.get("expires_at"), int), rep)
        await step(r, "whoami after signup", whoami_ok("whoami after signup"))

        async def logout():
            rep = await c.request("logout")
            r.check("logout -> logged_out", rep.get("type") == "logged_out", rep)
        await step(r, "logout", logout())

        async def whoami_unauth():
            rep = await c.request("whoami")
            r.check("whoami after logout -> error not_authenticated",
                    is_error(rep, "not_authenticated") and isinstance(rep.get("message"), str), rep)
        await step(r, "whoami after logout", whoami_unauth())

        async def login_bad(label, user, pw):
            rep = await c.request("login", username=user, password=pw)
            r.check(f"{label} -> error invalid_credentials", is_error(rep, "invalid_credentials"), rep)
            return rep
        bad_pw = await step(r, "login wrong password",
                            login_bad("login wrong password", username, password + "x"))
        unknown = await step(r, "login unknown user",
                             login_bad("login unknown user", "nouser_" + secrets.token_hex(6), password))
        if bad_pw and unknown:
            r.check("wrong password and unknown user give the same message",
                    bad_pw.get("message") == unknown.get("message"),
                    (bad_pw.get("message"), unknown.get("message")))

        async def login_ok():
            nonlocal token
            rep = await c.request("login", username=username, password=password)
            tok = rep.get("token")
            if r.check("login right -> session with 32-byte token",
                       rep.get("type") == "session" and rep.get("username") == username
                       and isinstance(tok, bytes) and len(tok) == 32, rep):
                token = tok
        await step(r, "login right", login_ok())

        # finish politely: FIN on the control stream, expect server close with code 0
        c.send_raw(b"", end_stream=True)
        ev = await step(r, "conn1 close", c.wait_terminated())
        if ev is not None:
            r.check("conn1: client FIN -> server closes with application code 0",
                    ev.frame_type is None and ev.error_code == CLOSE_NORMAL,
                    f"code={ev.error_code} frame_type={ev.frame_type} reason={ev.reason_phrase!r}")

    # ---- connection 2: resume + pipelining + error handling ---------------------------
    async with connection(args, cfg) as c:
        c.open_control_stream()
        await step(r, "conn2 hello", do_hello(r, c, "conn2"))

        async def resume():
            if token is None:
                r.check("resume with saved token", False, "no token from login")
                return
            rep = await c.request("resume", token=token)
            r.check("resume -> resumed as same user",
                    rep.get("type") == "resumed" and rep.get("username") == username
                    and isinstance(rep.get("expires_at"), int), rep)
            rep = await c.request("whoami")
            r.check("whoami after resume -> " + username,
                    rep.get("type") == "whoami" and rep.get("username") == username, rep)
        await step(r, "resume", resume())

        async def pipelining():
            sent = [c.send_request("ping") for _ in range(3)]   # no awaiting in between
            replies = [await c.wait_reply(f) for _, f in sent]
            ids = [rid for rid, _ in sent]
            ok = all(rep.get("type") == "pong" and rep.get("id") == rid
                     for rid, rep in zip(ids, replies))
            r.check(f"pipelining: 3 pings {ids} -> 3 pongs matched by id", ok, replies)
        await step(r, "pipelining", pipelining())

        async def quiet_ack():
            rid = c.next_id       # no reply is expected, so no pending entry: a reply to it
            c.next_id += 1        # would be flagged as a reply with an unexpected id
            c.send_raw(encode_frame({"id": rid, "type": "ack", "seqs": [1], "quiet": True}))
            rep = await c.request("ping")
            r.check("quiet ack -> no reply (the next frame is the ping's pong)",
                    rep.get("type") == "pong" and c.protocol_error is None,
                    (rep, c.protocol_error))
        await step(r, "quiet ack", quiet_ack())

        async def malformed():
            garbage = b"\xc1\xff\x00"   # 0xc1 is never used in MessagePack
            c.send_raw(struct.pack(">I", len(garbage)) + garbage)
            frame = await c.next_connection_frame()
            r.check("garbage MessagePack -> error malformed_frame without id",
                    is_error(frame, "malformed_frame") and "id" not in frame, frame)
            rep = await c.request("ping")
            r.check("connection still usable after malformed_frame", rep.get("type") == "pong", rep)
        await step(r, "malformed frame", malformed())

        async def nesting():
            # Section 2: the body's map is level 1; each map or array in it adds one, up to 16.
            def nested(levels, maps):
                x = "leaf"
                for _ in range(levels - 1):
                    x = {"k": x} if maps else [x]
                return x
            for maps in (True, False):
                what = "maps" if maps else "arrays"
                rid, fut = c.send_request("ping", x=nested(16, maps))
                rep = await c.wait_reply(fut)
                r.check(f"16 levels of {what} -> pong", rep.get("type") == "pong"
                        and rep.get("id") == rid, rep)
                body = msgpack.packb({"id": c.next_id, "type": "ping", "x": nested(17, maps)})
                c.next_id += 1
                c.send_raw(struct.pack(">I", len(body)) + body)
                frame = await c.next_connection_frame()
                r.check(f"17 levels of {what} -> error malformed_frame without id",
                        is_error(frame, "malformed_frame") and "id" not in frame, frame)
        await step(r, "nesting limit", nesting())

        async def unknown_request():
            rid, fut = c.send_request("frobnicate", foo=1)
            rep = await c.wait_reply(fut)
            r.check("unknown request type -> error unknown_request with its id",
                    is_error(rep, "unknown_request") and rep.get("id") == rid, rep)
        await step(r, "unknown request", unknown_request())

        async def oversize():
            c.send_raw(struct.pack(">I", MAX_FRAME + 1))   # length prefix only, no body
            frame = await c.next_connection_frame()
            r.check("length prefix 65537 -> error frame_too_large without id",
                    is_error(frame, "frame_too_large") and "id" not in frame, frame)
            ev = await c.wait_terminated()
            r.check("frame_too_large -> connection closed with application code 2",
                    ev.frame_type is None and ev.error_code == CLOSE_PROTOCOL_VIOLATION,
                    f"code={ev.error_code} frame_type={ev.frame_type} reason={ev.reason_phrase!r}")
        await step(r, "oversize frame", oversize())

        r.check("conn2: no unexpected frames/streams", c.protocol_error is None, c.protocol_error)


def parse_server(s: str):
    host, _, port = s.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    return host, int(port)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", type=parse_server, default=("127.0.0.1", 4433),
                    help="HOST:PORT (default 127.0.0.1:4433)")
    ap.add_argument("--ca", required=True, help="CA certificate to trust (e.g. certs/ca.crt)")
    args = ap.parse_args()
    args.host, args.port = args.server
    try:
        ipaddress.ip_address(args.host)
        kind = "IP address"
    except ValueError:
        kind = "DNS name"
    print(f"# server {args.host}:{args.port} (verifying {kind} against {args.ca})")

    r = Results()
    try:
        asyncio.run(main_flow(args, r))
    except Exception as e:  # connection-level failure (handshake, verification, ...)
        r.check("connection", False, f"{type(e).__name__}: {e}")
    print(f"interop: {r.passed} passed, {r.failed} failed")
    sys.exit(1 if r.failed or not r.passed else 0)


if __name__ == "__main__":
    main()
