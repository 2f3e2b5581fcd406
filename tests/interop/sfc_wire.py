"""The wire of SecureFastChat (ALPN sfc/1) for the interop client, from docs/PROTOCOL.md only.

Framing (section 2), one QUIC connection with its control stream (section 3), message streams
the client sends (5.2), delivery streams the server pushes (5.3), upload and blob streams
(5.6), events (2.2), and the PASS/FAIL bookkeeping shared by the check flows.
"""

import asyncio
import ssl
import struct

import msgpack
from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)

ALPN = "sfc/1"
MAX_FRAME = 65_536          # PROTOCOL.md §2 / §7
MAX_HEADER = 1_024          # message-stream header frame (§5.2)
MAX_DELIVERED_BODY = 61_440  # the largest envelope a client accepts on delivery (§5.3)
REPLY_TIMEOUT = 10.0        # seconds; argon2id hashing can take a moment
CLOSE_NORMAL, CLOSE_SHUTDOWN, CLOSE_PROTOCOL_VIOLATION = 0, 1, 2
CLOSE_DEVICE_REMOVED = 7


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

def encode_frame(obj, limit: int = MAX_FRAME) -> bytes:
    """length: u32 big-endian, then exactly one MessagePack map (§2)."""
    body = msgpack.packb(obj, use_bin_type=True)  # str -> str, bytes -> bin
    if len(body) > limit:
        raise ValueError("frame body too large")
    return struct.pack(">I", len(body)) + body


def decode_body(body: bytes, control: bool = True) -> dict:
    """Decode exactly one MessagePack value; trailing bytes are an error (§2).

    `control`: a control-stream frame, whose `id` (if any) is a uint; a stream header's `id`
    is the bin 16 message id instead (5.3).
    """
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
    if control and "id" in value and not (isinstance(value["id"], int) and value["id"] >= 0):
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


# `deliver` header fields and their types (5.3); `to` only on copies of one's own messages.
DELIVER_FIELDS = {"seq": int, "prev": int, "id": bytes, "from": str, "from_device": int,
                  "sent_at": int, "kind": str, "length": int}


def parse_delivery(data: bytes) -> "tuple[dict, bytes]":
    """A whole delivery stream: header frame (≤ 1,024 bytes), then exactly `length` bytes."""
    if len(data) < 4:
        raise ProtocolError("delivery stream ended inside the header's length")
    (hlen,) = struct.unpack(">I", data[:4])
    if hlen > MAX_HEADER:
        raise ProtocolError(f"delivery header length {hlen} > {MAX_HEADER}")
    if len(data) < 4 + hlen:
        raise ProtocolError("delivery stream ended inside the header")
    header = decode_body(bytes(data[4:4 + hlen]), control=False)
    if header["type"] != "deliver":
        raise ProtocolError(f"delivery header of type {header['type']!r}")
    for key, kind in DELIVER_FIELDS.items():
        value = header.get(key)
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
            raise ProtocolError(f"delivery header field {key!r} missing or mistyped: {header!r}")
    if len(header["id"]) != 16:
        raise ProtocolError(f"delivery id of {len(header['id'])} bytes")
    if "to" in header and not isinstance(header["to"], str):
        raise ProtocolError(f"delivery `to` is not a str: {header!r}")
    if header["length"] > MAX_DELIVERED_BODY:
        raise ProtocolError(f"delivery announces {header['length']} bytes")
    body = bytes(data[4 + hlen:])
    if len(body) != header["length"]:
        raise ProtocolError(f"delivery body of {len(body)} bytes, header says {header['length']}")
    return header, body


# --------------------------------------------------------------------------- client

class SfcProtocol(QuicConnectionProtocol):
    """One QUIC connection: one control stream (client-initiated bidi), message streams the
    client opens (client-initiated uni) and delivery streams from the server (server uni)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream_id = None
        self.reader = FrameReader()
        self.next_id = 1
        self.pending = {}                     # id -> Future(reply dict)
        self.conn_frames = asyncio.Queue()    # frames without id (connection-level)
        self.event_backlog = []               # events skipped by wait_event, oldest first
        self.delivery_streams = {}            # server uni stream id -> bytes so far
        self.blob_streams = {}                # server uni stream id -> (header, bytes so far)
        self.blobs = asyncio.Queue()          # (header, bytes) of complete blob streams (5.6)
        self.deliveries = asyncio.Queue()     # (header, body) of complete delivery streams
        self.delivery_backlog = []            # deliveries skipped by wait_delivery
        self.stopped_streams = []             # (stream id, code) of STOP_SENDING from the server
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

    def send_message(self, header: dict, body: bytes) -> int:
        """One message stream (5.2): header frame (≤ 1,024 bytes), the body, FIN."""
        sid = self._quic.get_next_available_stream_id(is_unidirectional=True)
        self._quic.send_stream_data(sid, encode_frame(header, MAX_HEADER) + body, end_stream=True)
        self.transmit()
        return sid

    def send_upload(self, blob: bytes, offset: int, data: bytes, end: bool = True) -> int:
        """One upload stream (5.6): header frame, bytes of the blob from `offset`, FIN."""
        sid = self._quic.get_next_available_stream_id(is_unidirectional=True)
        header = {"type": "upload", "blob": blob, "offset": offset}
        self._quic.send_stream_data(sid, encode_frame(header, MAX_HEADER) + data, end_stream=end)
        self.transmit()
        return sid

    async def wait_blob(self, timeout=REPLY_TIMEOUT) -> "tuple[dict, bytes]":
        """The next complete blob stream: its header and its bytes."""
        return await asyncio.wait_for(self.blobs.get(), timeout)

    async def next_connection_frame(self, timeout=REPLY_TIMEOUT) -> dict:
        return await asyncio.wait_for(self.conn_frames.get(), timeout)

    async def wait_event(self, match, timeout=REPLY_TIMEOUT) -> dict:
        """The first event (frame without id) for which `match(frame)` holds; the others stay
        in a backlog for later waits (events of unrelated causes interleave, 2.2)."""
        for i, frame in enumerate(self.event_backlog):
            if match(frame):
                return self.event_backlog.pop(i)
        loop = asyncio.get_event_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError("no matching event within %.0fs" % timeout)
            frame = await asyncio.wait_for(self.conn_frames.get(), left)
            if match(frame):
                return frame
            self.event_backlog.append(frame)

    async def wait_delivery(self, match=lambda h, b: True, timeout=REPLY_TIMEOUT):
        """The first complete delivery (header, body) for which `match` holds."""
        for i, (header, body) in enumerate(self.delivery_backlog):
            if match(header, body):
                return self.delivery_backlog.pop(i)
        loop = asyncio.get_event_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError("no matching delivery within %.0fs" % timeout)
            header, body = await asyncio.wait_for(self.deliveries.get(), left)
            if match(header, body):
                return header, body
            self.delivery_backlog.append((header, body))

    def take_deliveries(self) -> list:
        """Every delivery received and not yet taken, without waiting."""
        out, self.delivery_backlog = self.delivery_backlog, []
        while not self.deliveries.empty():
            out.append(self.deliveries.get_nowait())
        return out

    async def wait_terminated(self, timeout=REPLY_TIMEOUT):
        return await asyncio.wait_for(asyncio.shield(self.closed), timeout)

    # -- receiving
    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived):
            if event.stream_id != self.stream_id:
                self._uni_data(event)
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
        elif isinstance(event, StopSendingReceived):
            self.stopped_streams.append((event.stream_id, event.error_code))
        elif isinstance(event, StreamReset):
            self.protocol_error = f"stream {event.stream_id} reset code {event.error_code}"
        elif isinstance(event, ConnectionTerminated):
            if not self.closed.done():
                self.closed.set_result(event)

    def _uni_data(self, event):
        # Server-initiated unidirectional streams have ids ≡ 3 (mod 4) (RFC 9000 §2.1); they
        # are the only other streams the server may send on (section 1).
        if event.stream_id % 4 != 3:
            self.protocol_error = f"data on unexpected stream {event.stream_id}"
            return
        if event.stream_id in self.blob_streams:
            self._blob_data(event)
            return
        buf = self.delivery_streams.setdefault(event.stream_id, bytearray())
        buf += event.data
        if len(buf) >= 4:
            # A blob stream (5.6) is told apart by its header's `type`, and may be long.
            (hlen,) = struct.unpack(">I", buf[:4])
            if hlen <= MAX_HEADER and len(buf) >= 4 + hlen:
                try:
                    header = decode_body(bytes(buf[4:4 + hlen]), control=False)
                except Exception:  # noqa: BLE001 - reported by parse_delivery below
                    header = {}
                if header.get("type") == "blob":
                    del self.delivery_streams[event.stream_id]
                    self.blob_streams[event.stream_id] = (header, bytearray(buf[4 + hlen:]))
                    self._blob_data(event, fed=True)
                    return
        if len(buf) > 4 + MAX_HEADER + MAX_DELIVERED_BODY:
            self.protocol_error = f"delivery stream {event.stream_id} longer than any delivery"
            return
        if event.end_stream:
            del self.delivery_streams[event.stream_id]
            try:
                self.deliveries.put_nowait(parse_delivery(buf))
            except ProtocolError as e:
                self.protocol_error = f"delivery stream {event.stream_id}: {e}"


    def _blob_data(self, event, fed: bool = False):
        header, buf = self.blob_streams[event.stream_id]
        if not fed:
            buf += event.data
        want = header.get("length", 0) - header.get("offset", 0)
        if len(buf) > want:
            self.protocol_error = f"blob stream {event.stream_id} longer than its header says"
            return
        if event.end_stream:
            del self.blob_streams[event.stream_id]
            if len(buf) != want:
                self.protocol_error = f"blob stream {event.stream_id} ended after {len(buf)} bytes"
                return
            self.blobs.put_nowait((header, bytes(buf)))


def make_config(ca_path: str, host: str) -> QuicConfiguration:
    cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
    cfg.verify_mode = ssl.CERT_REQUIRED       # never "accept any certificate"
    cfg.load_verify_locations(cafile=ca_path)
    cfg.server_name = host                     # verified against DNS or IP SAN
    cfg.idle_timeout = 60.0
    return cfg


def connection(args, cfg):
    return connect(args.host, args.port, configuration=cfg,
                   create_protocol=SfcProtocol, wait_connected=True)


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


async def do_hello(r, c, label):
    rep = await c.request("hello", version=1, client="sfc-interop-py/1")
    ok = (rep.get("type") == "hello" and rep.get("version") == 1
          and isinstance(rep.get("server"), str) and rep.get("max_frame") == MAX_FRAME)
    r.check(f"{label}: hello -> hello v1, max_frame {MAX_FRAME}", ok, rep)
    return rep
