"""Checks D1–D6: two devices of one account against the real server, from docs/PROTOCOL.md only.

D1 links alice's second device with the E13 exchange (5.5); D2 bob sends one copy per device of
alice (5.2) and each device receives its own (5.3); D3 alice's device 2 sends with a copy for
her device 1 (`own_devices`, `to`); D4 a stale device list and the retry under the same id; D5 a
wrong link code; D6 removing device 2 (close code 7, `unknown_device`, `invalid_token`).

Message bodies are opaque bytes, distinct per copy: the interop client does not implement the
Double Ratchet, and the server never looks inside a body (5.2).
"""

import asyncio
import contextlib
import secrets
import time

from devices_crypto import (
    SIGNED_PREKEY_LABEL,
    Identity,
    LinkError,
    LinkKeys,
    decode_payload,
    device_keys,
    draw_secret,
    encode_payload,
    finish_pake,
    spake_existing,
    spake_new,
    verify_signed_prekey,
)
from sfc_wire import CLOSE_DEVICE_REMOVED, connection, is_error

ONE_TIME_PREKEYS = 12          # device 1 drops below 10 (`prekeys_low`, 5.1) at D3.1's fetch
LINK_LIFETIME = 300            # seconds (5.5)
DEVICE_2_NAME = "interop laptop"
QUIET_GRACE = 0.3              # seconds to wait for a delivery that must not come


class Skip(Exception):
    """A check this one depends on failed; the rest of the devices flow cannot run."""


class Flow:
    """State shared by the checks: the accounts, their connections and keys."""

    def __init__(self, args, cfg, r, stack):
        self.args, self.cfg, self.r, self.stack = args, cfg, r, stack
        tag = secrets.token_hex(5)
        self.alice, self.bob = "ia_" + tag, "ib_" + tag
        self.password = "pw-" + secrets.token_urlsafe(16)
        self.alice_id, self.bob_id = Identity(), Identity()
        self.a1 = self.a2 = self.b = None   # alice's device 1 and 2, bob
        self.a2_token = None
        self.spare = None                   # D5's unauthenticated connection

    def check(self, name, cond, detail=""):
        return self.r.check(name, cond, detail)

    def need(self, name, cond, detail=""):
        """A check the next ones build on: a failure stops the flow."""
        if not self.check(name, cond, detail):
            raise Skip(name)

    async def connect(self):
        """A new connection after a successful `hello` (section 3)."""
        c = await self.stack.enter_async_context(connection(self.args, self.cfg))
        c.open_control_stream()
        rep = await c.request("hello", version=1, client="sfc-interop-py/1")
        if rep.get("type") != "hello":
            raise Skip(f"hello refused: {rep!r}")
        return c


def message_id() -> bytes:
    return secrets.token_bytes(16)


def copy_body(what: str, device: int) -> bytes:
    """Distinct bytes (and lengths) per copy, so a copy given to the wrong device shows."""
    return f"{what} / copy for device {device} / ".encode() + secrets.token_bytes(8 * device)


def send_header(mid, to, copies, own_copies=()) -> "tuple[dict, bytes]":
    """A `send` header and body (5.2) for [(device, body)] of the recipient, then of one's own
    other devices; `own_devices` left out when empty (it is optional)."""
    bodies = [b for _, b in copies] + [b for _, b in own_copies]
    header = {"type": "send", "id": mid, "to": to, "kind": "text",
              "length": sum(len(b) for b in bodies),
              "devices": [d for d, _ in copies], "lengths": [len(b) for b in bodies]}
    if own_copies:
        header["own_devices"] = [d for d, _ in own_copies]
    return header, b"".join(bodies)


async def send_and_wait(c, header, body) -> dict:
    """One message stream; its single event, `sent` or `send_failed` (5.2)."""
    mid = header["id"]
    c.send_message(header, body)
    return await c.wait_event(lambda f: f.get("type") in ("sent", "send_failed")
                              and f.get("message_id") == mid)


def of_message(mid):
    return lambda header, _body: header["id"] == mid


async def ack(c, header) -> dict:
    return await c.request("ack", seqs=[header["seq"]])


async def none_more(conns, mid) -> bool:
    """True when no connection got another delivery of `mid` within a short grace."""
    await asyncio.sleep(QUIET_GRACE)
    return not any(h["id"] == mid for c in conns for h, _ in c.take_deliveries())


# --------------------------------------------------------------------------- D1

async def d1_link(f: Flow):
    f.a1 = await f.connect()
    rep = await f.a1.request("signup", username=f.alice, password=f.password)
    f.need("D1.1 alice signup -> session for device 1",
           rep.get("type") == "session" and rep.get("device") == 1, rep)
    rep = await f.a1.request("publish_keys", **device_keys(f.alice_id, ONE_TIME_PREKEYS, True))
    f.need(f"D1.2 alice device 1 publish_keys -> keys_published {ONE_TIME_PREKEYS}",
           rep.get("type") == "keys_published" and rep.get("one_time_prekeys") == ONE_TIME_PREKEYS,
           rep)

    f.b = await f.connect()
    rep = await f.b.request("signup", username=f.bob, password=f.password)
    keys = await f.b.request("publish_keys", **device_keys(f.bob_id, ONE_TIME_PREKEYS, True))
    f.need("D1.3 bob signup + publish_keys -> session device 1, keys_published",
           rep.get("type") == "session" and rep.get("device") == 1
           and keys.get("type") == "keys_published", (rep, keys))
    # alice's device 1 pins bob's identity, so the link payload carries a contact (E13.4)
    ident = await f.a1.request("fetch_identity", username=f.bob)
    bob_key = ident.get("identity_key")

    # E opens the link
    secret = draw_secret()
    e_side = spake_existing(f.alice, secret)
    pake_e = e_side.start()
    opened = await f.a1.request("link_open", pake=pake_e)
    slot = opened.get("slot")
    now = time.time()
    f.need("D1.4 link_open -> link_opened, slot 0-9999, expires_at about now + 300 s",
           opened.get("type") == "link_opened" and isinstance(slot, int) and 0 <= slot <= 9999
           and isinstance(opened.get("expires_at"), int)
           and now + LINK_LIFETIME - 5 <= opened["expires_at"] <= now + LINK_LIFETIME + 5,
           opened)

    # N joins with the typed code SSSS-PPPPPP: slot and secret
    f.a2 = await f.connect()
    n_side = spake_new(f.alice, secret)
    pake_n = n_side.start()
    joined = await f.a2.request("link_join", username=f.alice, slot=slot, pake=pake_n,
                                name=DEVICE_2_NAME)
    f.need("D1.5 link_join from a new connection (hello only) -> link_pake with E's pake",
           joined.get("type") == "link_pake" and joined.get("pake") == pake_e, joined)
    n_keys = LinkKeys(finish_pake(n_side, joined["pake"], 0x41), f.alice, slot, pake_e, pake_n)
    _, confirm_fut = f.a2.send_request("link_confirm", confirm=n_keys.c_n)

    # E gets the request, checks c_N, accepts with c_E and the sealed payload
    req = await f.a1.wait_event(lambda fr: fr.get("type") == "link_request")
    e_keys = None
    if req.get("slot") == slot and isinstance(req.get("pake"), bytes):
        e_keys = LinkKeys(finish_pake(e_side, req["pake"], 0x42), f.alice, slot, pake_e,
                          req["pake"])
    f.need("D1.6 link_confirm -> E gets link_request {slot, name, N's pake, c_N}; c_N verifies",
           e_keys is not None and req.get("name") == DEVICE_2_NAME and req.get("pake") == pake_n
           and e_keys.c_n_verifies(req.get("confirm")), req)
    payload = encode_payload(f.alice, f.alice_id.seed,
                             [{"username": f.bob, "identity_key": bob_key, "verified": False}])
    accepted = await f.a1.request("link_accept", slot=slot, confirm=e_keys.c_e,
                                  payload=e_keys.seal(payload))
    f.need("D1.7 link_accept {c_E, sealed payload} -> link_accepted device 2",
           accepted.get("type") == "link_accepted" and accepted.get("device") == 2, accepted)

    # N: linked, checks c_E before opening anything (E13.3 step 4)
    linked = await f.a2.wait_reply(confirm_fut)
    token = linked.get("token")
    f.need("D1.8 N's link_confirm -> linked {username, device 2, 32-byte token, expires_at};"
           " c_E verifies",
           linked.get("type") == "linked" and linked.get("username") == f.alice
           and linked.get("device") == 2 and isinstance(token, bytes) and len(token) == 32
           and isinstance(linked.get("expires_at"), int) and linked["expires_at"] > now
           and n_keys.c_e_verifies(linked.get("confirm")), linked)
    f.a2_token = token
    try:
        opened_payload = decode_payload(n_keys.open(linked.get("payload", b"")), f.alice)
    except LinkError as e:
        opened_payload = {"error": str(e)}
    n_identity = Identity(opened_payload.get("identity_seed", bytes(32)))
    f.need("D1.9 N opens the payload: the account, the seed of alice's identity key, contact bob",
           "error" not in opened_payload and n_identity.public == f.alice_id.public
           and opened_payload["contacts"] == [{"username": f.bob, "identity_key": bob_key,
                                               "verified": False}], opened_payload)

    # 5.5 step 5: until N has published, fetches of all devices leave it out, and a fetch of
    # it by id gets no_keys (this fetch takes one of device 1's one-time prekeys)
    everyone = await f.b.request("fetch_bundle", username=f.alice)
    only_2 = await f.b.request("fetch_bundle", username=f.alice, devices=[2])
    f.check("D1.10 before device 2 publishes: a fetch of all devices gives [1], of [2] no_keys",
            [e.get("device") for e in everyone.get("devices") or []] == [1]
            and is_error(only_2, "no_keys"), (everyone, only_2))

    # N publishes its own prekeys, signed with the identity from the payload
    rep = await f.a2.request("publish_keys", **device_keys(n_identity, ONE_TIME_PREKEYS, True))
    f.need("D1.11 device 2 publish_keys signed with the payload's identity -> keys_published",
           rep.get("type") == "keys_published" and rep.get("one_time_prekeys") == ONE_TIME_PREKEYS,
           rep)

    who = await f.a2.request("whoami")
    listed = await f.a1.request("list_devices")
    devices = listed.get("devices") or []
    summary = [(d.get("device"), d.get("name"), d.get("current")) for d in devices]
    f.need("D1.12 whoami on N -> device 2; list_devices -> 1 'first device' (current), 2 named",
           who.get("type") == "whoami" and who.get("device") == 2
           and listed.get("type") == "devices"
           and summary == [(1, "first device", True), (2, DEVICE_2_NAME, False)]
           and all(isinstance(d.get("added_at"), int) and isinstance(d.get("last_seen"), int)
                   for d in devices), (who, listed))


# --------------------------------------------------------------------------- D2

async def d2_copies_to_devices(f: Flow):
    bundle = await f.b.request("fetch_bundle", username=f.alice)
    entries = bundle.get("devices") or []
    f.need("D2.1 bob fetch_bundle alice -> one DeviceBundle per device [1, 2], each with a"
           " one-time prekey",
           bundle.get("type") == "bundle" and bundle.get("username") == f.alice
           and bundle.get("identity_key") == f.alice_id.public
           and [e.get("device") for e in entries] == [1, 2]
           and all(isinstance(e.get("one_time_prekey"), dict) and "last_resort" not in e
                   for e in entries), bundle)
    f.check("D2.2 each device's signed prekey verifies under alice's identity (E3.2); the"
            " top level repeats devices[0]",
            all(verify_signed_prekey(bundle["identity_key"], e.get("signed_prekey", {}),
                                     SIGNED_PREKEY_LABEL) for e in entries)
            and bundle.get("signed_prekey") == entries[0].get("signed_prekey")
            and bundle.get("one_time_prekey") == entries[0].get("one_time_prekey"), bundle)

    mid = message_id()
    copies = [(1, copy_body("bob to alice", 1)), (2, copy_body("bob to alice", 2))]
    header, body = send_header(mid, f.alice, copies)
    ev = await send_and_wait(f.b, header, body)
    f.need("D2.3 bob sends with devices [1, 2] and lengths -> sent, duplicate false",
           ev.get("type") == "sent" and ev.get("duplicate") is False, ev)

    acks = []
    for n, (c, (device, expected)) in enumerate(zip((f.a1, f.a2), copies), start=4):
        h, got = await c.wait_delivery(of_message(mid))
        f.check(f"D2.{n} alice device {device} gets its copy: from bob, from_device 1, no `to`,"
                " its own body bytes",
                h["from"] == f.bob and h["from_device"] == 1 and "to" not in h
                and h["kind"] == "text" and got == expected, (h, got[:40]))
        acks.append(await ack(c, h))
    f.check("D2.6 each copy is delivered exactly once (acked: removed 1 each, nothing again)",
            all(a.get("type") == "acked" and a.get("removed") == 1 for a in acks)
            and await none_more((f.a1, f.a2), mid), acks)


# --------------------------------------------------------------------------- D3

async def d3_own_copies(f: Flow):
    theirs = await f.a2.request("fetch_bundle", username=f.bob)
    mine = await f.a2.request("fetch_bundle", username=f.alice, devices=[1])
    f.check("D3.1 device 2 fetches bob's bundle and its own device 1's (devices [1])",
            [e.get("device") for e in theirs.get("devices") or []] == [1]
            and [e.get("device") for e in mine.get("devices") or []] == [1]
            and verify_signed_prekey(mine.get("identity_key", b""),
                                     mine["devices"][0].get("signed_prekey", {}),
                                     SIGNED_PREKEY_LABEL), (theirs, mine))
    # device 1 had 12 one-time prekeys; D1.10, D2.1 and this fetch took one each
    low = await f.a1.wait_event(lambda fr: fr.get("type") == "prekeys_low")
    f.check("D3.2 alice device 1 gets prekeys_low {remaining: 9} (fewer than 10 left, 5.1)",
            low.get("remaining") == ONE_TIME_PREKEYS - 3, low)

    mid = message_id()
    to_bob = copy_body("alice device 2 to bob", 1)
    to_self = copy_body("alice device 2, own copy", 1) + b"own"
    header, body = send_header(mid, f.bob, [(1, to_bob)], [(1, to_self)])
    ev = await send_and_wait(f.a2, header, body)
    f.need("D3.3 device 2 sends to bob with devices [1], own_devices [1] -> sent",
           ev.get("type") == "sent" and ev.get("duplicate") is False, ev)

    h, got = await f.b.wait_delivery(of_message(mid))
    f.check("D3.4 bob gets his copy: from alice, from_device 2, no `to`, his body bytes",
            h["from"] == f.alice and h["from_device"] == 2 and "to" not in h and got == to_bob,
            (h, got[:40]))
    await ack(f.b, h)
    h, got = await f.a1.wait_delivery(of_message(mid))
    f.check("D3.5 alice device 1 gets the own copy: from alice, from_device 2, to bob, its body"
            " bytes; device 2 gets none",
            h["from"] == f.alice and h["from_device"] == 2 and h.get("to") == f.bob
            and got == to_self and await none_more((f.a2,), mid), (h, got[:40]))
    await ack(f.a1, h)


# --------------------------------------------------------------------------- D4

async def d4_stale_list(f: Flow):
    mid = message_id()
    header, body = send_header(mid, f.alice, [(1, copy_body("bob, stale list", 1))])
    ev = await send_and_wait(f.b, header, body)
    f.check("D4.1 bob sends with devices [1] only -> send_failed stale_devices, devices [1, 2],"
            " own_devices []",
            ev.get("type") == "send_failed" and ev.get("code") == "stale_devices"
            and ev.get("devices") == [1, 2] and ev.get("own_devices") == []
            and isinstance(ev.get("message"), str), ev)

    copies = [(d, copy_body("bob, retried", d)) for d in ev.get("devices") or [1, 2]]
    header, body = send_header(mid, f.alice, copies)
    ev = await send_and_wait(f.b, header, body)
    f.need("D4.2 the retry under the same id with devices [1, 2] -> sent, duplicate false",
           ev.get("type") == "sent" and ev.get("duplicate") is False, ev)
    got = []
    for c in (f.a1, f.a2):
        h, b = await c.wait_delivery(of_message(mid))
        got.append((h["from_device"], b))
        await ack(c, h)
    f.check("D4.3 each of alice's devices gets its copy of the retry once, nothing of the"
            " refused send", got == [(1, copies[0][1]), (1, copies[1][1])]
            and await none_more((f.a1, f.a2), mid), got)


# --------------------------------------------------------------------------- D5

async def d5_wrong_code(f: Flow):
    secret = draw_secret()
    e_side = spake_existing(f.alice, secret)
    pake_e = e_side.start()
    opened = await f.a1.request("link_open", pake=pake_e)
    slot = opened.get("slot")
    n = await f.connect()
    n_side = spake_new(f.alice, (secret + 1) % 1_000_000)    # the code typed wrong
    pake_n = n_side.start()
    joined = await n.request("link_join", username=f.alice, slot=slot, pake=pake_n,
                             name="interop wrong code")
    f.need("D5.1 link_open -> link_opened; link_join with a wrong secret -> link_pake",
           opened.get("type") == "link_opened" and joined.get("type") == "link_pake", (opened,
                                                                                       joined))
    n_keys = LinkKeys(finish_pake(n_side, joined["pake"], 0x41), f.alice, slot, pake_e, pake_n)
    _, confirm_fut = n.send_request("link_confirm", confirm=n_keys.c_n)

    req = await f.a1.wait_event(lambda fr: fr.get("type") == "link_request")
    e_keys = LinkKeys(finish_pake(e_side, req["pake"], 0x42), f.alice, slot, pake_e, req["pake"])
    verifies = e_keys.c_n_verifies(req.get("confirm"))
    refused = await f.a1.request("link_refuse", slot=slot)
    f.check("D5.2 E: c_N does not verify -> link_refuse -> link_refused",
            not verifies and refused.get("type") == "link_refused", (verifies, refused))
    failed = await n.wait_reply(confirm_fut)
    who = await n.request("whoami")
    f.check("D5.3 N's link_confirm -> error link_failed; N stays unauthenticated",
            is_error(failed, "link_failed") and is_error(who, "not_authenticated"), (failed, who))
    listed = await f.a1.request("list_devices")
    f.check("D5.4 list_devices -> still devices [1, 2]: no device added",
            [d.get("device") for d in listed.get("devices") or []] == [1, 2], listed)
    # the wrong-code connection stays for D6's login
    f.spare = n


# --------------------------------------------------------------------------- D6

async def d6_remove(f: Flow):
    rep = await f.a1.request("remove_device", device=2, password=f.password)
    f.check("D6.1 remove_device 2 from device 1 with the password -> device_removed 2",
            rep.get("type") == "device_removed" and rep.get("device") == 2, rep)
    ev = await f.a2.wait_terminated()
    f.check("D6.2 device 2's connection is closed with application code 7",
            ev.frame_type is None and ev.error_code == CLOSE_DEVICE_REMOVED,
            f"code={ev.error_code} frame_type={ev.frame_type} reason={ev.reason_phrase!r}")

    rep = await f.spare.request("login", username=f.alice, password=f.password, device=2)
    f.check("D6.3 login alice with device 2 -> error unknown_device",
            is_error(rep, "unknown_device"), rep)
    rep = await f.spare.request("resume", token=f.a2_token, deliver=False)
    f.check("D6.4 resume with device 2's token -> error invalid_token",
            is_error(rep, "invalid_token"), rep)

    listed = await f.a1.request("list_devices")
    mid = message_id()
    header, body = send_header(mid, f.alice, [(d, copy_body("bob after removal", d))
                                              for d in (1, 2)])
    ev = await send_and_wait(f.b, header, body)
    f.check("D6.5 list_devices -> [1]; bob's send for [1, 2] -> stale_devices, devices [1]",
            [d.get("device") for d in listed.get("devices") or []] == [1]
            and ev.get("type") == "send_failed" and ev.get("code") == "stale_devices"
            and ev.get("devices") == [1], (listed, ev))


CHECKS = [("D1 link a second device", d1_link),
          ("D2 bob's copies for alice's devices", d2_copies_to_devices),
          ("D3 copies for one's own devices", d3_own_copies),
          ("D4 a stale device list", d4_stale_list),
          ("D5 a wrong link code", d5_wrong_code),
          ("D6 removing a device", d6_remove)]


async def devices_flow(args, cfg, r):
    """Runs D1–D6 in order; an exception or a failed prerequisite fails its group, and the
    groups after it are reported as not run (each a FAIL), so the total stays honest."""
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
                  (("alice device 1", f.a1), ("alice device 2", f.a2), ("bob", f.b),
                   ("wrong-code link", f.spare)) if c.protocol_error is not None}
        r.check("D6.6 no unexpected frames or streams on any of the connections", not errors,
                errors)
