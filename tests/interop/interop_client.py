#!/usr/bin/env python3
"""SecureFastChat (ALPN sfc/1) interop client, written from PROTOCOL.md only.

Usage: python3 interop_client.py --server 127.0.0.1:24433 --ca certs/ca.crt

Runs a fixed sequence of protocol checks, prints one PASS/FAIL line per check and
exits non-zero if any check failed: the account, session and framing checks below, then
the devices checks D1-D6 of devices_flow.py (linking, copies per device, stale lists,
removal), then the files checks F1-F5 of files_flow.py (blobs sealed as E15 says). The wire lives in sfc_wire.py, the client-side crypto in devices_crypto.py.
"""

import argparse
import asyncio
import ipaddress
import secrets
import struct
import sys
import time

import msgpack

from devices_flow import devices_flow
from files_flow import files_flow
from sfc_wire import (
    ALPN,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_VIOLATION,
    MAX_FRAME,
    Results,
    connection,
    do_hello,
    encode_frame,
    is_error,
    make_config,
    step,
)


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
    print("# devices (5.5, E13): alice links a second device, copies per device")
    try:
        asyncio.run(devices_flow(args, make_config(args.ca, args.host), r))
    except Exception as e:  # connection-level failure (handshake, verification, ...)
        r.check("devices connection", False, f"{type(e).__name__}: {e}")
    print("# files (5.6, E15): a sealed blob uploaded, resumed, downloaded and opened")
    try:
        asyncio.run(files_flow(args, make_config(args.ca, args.host), r))
    except Exception as e:  # connection-level failure (handshake, verification, ...)
        r.check("files connection", False, f"{type(e).__name__}: {e}")
    print(f"interop: {r.passed} passed, {r.failed} failed")
    sys.exit(1 if r.failed or not r.passed else 0)


if __name__ == "__main__":
    main()
