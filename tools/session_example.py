"""Generate docs/session-example.md: one whole minibus session, byte by byte, from a real run.

Usage (from the repository root)::

    python -m tools.session_example            # print the document
    python -m tools.session_example --write    # rewrite docs/session-example.md
    python -m tools.session_example --check    # exit 1 if docs/session-example.md is stale

Theory of operation
-------------------
A real broker (:class:`bus.broker.Broker`) runs in process on a temporary Unix socket and a
TCP port, and real clients (:func:`clients.open_bus`) talk to it.  Every byte the broker
reads and writes goes through a tap around each accepted socket, which records it in one
list, in the order the broker read and wrote it; the document is rendered from that list.

Only the inputs are fixed, never the code under test:

* identities come from fixed seeds;
* the shs1 ephemeral keys are derived from fixed text: ``bus.io.secure`` builds its
  handshakes through the names ``ClientHandshake`` and ``ServerHandshake``, which are
  replaced for the run by subclasses that pass ``ephemeral_secret`` (a parameter the sans-io
  handshake has for this) and put back afterwards;
* the broker's clock (``connected_since``) and SO_PEERCRED's pid and uid are fixed by a
  :class:`~bus.broker.Broker` subclass (the core's ``_clock``, and the ``pid``/``uid``
  arguments of ``_handle``);
* interleaving: the tap lets the broker read from a connection only once every task is
  idle, the first connection first, so the two clients' messages meet the broker in the
  same order in every run.  (What each connection carries does not depend on it.)

Everything derived from the run is also checked here: the handshake messages and the
box-stream keys are recomputed from the fixed secrets with the bare primitives, and every
frame is cut and decoded with the real frame decoder.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.bindings as sodium
import trio
import trio.testing

import bus.io.secure as secure_module
from bus.broker import Broker, BrokerConfig
from bus.core.broker import Limits
from bus.core.policy import Policy
from bus.wire.boxstream import BoxStreamDecoder, BoxStreamEncoder
from bus.wire.frames import HEADER, ControlFrame, DataFrame, FrameDecoder
from bus.wire.identity import Identity, PublicKey
from bus.wire.shs import DEFAULT_NETWORK_KEY, ClientHandshake, ServerHandshake
from clients import Channel, open_bus

__all__ = ["DOCUMENT", "generate", "render_cbor", "cbor_diagnostic", "main"]

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "docs" / "session-example.md"

CONNECTED_SINCE = 1700000000.0
PEER_PID, PEER_UID = 4242, 1000
RELAY_CREDIT = 256  # the example's [limits] relay_credit (default 524288)
WINDOW = 256  # the channel window both ends use (the client library's default is 524288)
LINE = b"hello, echo\n"
NAME = "org.example.Echo"


def _seed(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


SEED_TEXT = {
    "broker": "minibus session example: broker",
    "A": "minibus session example: A",
    "B": "minibus session example: B",
    "C": "minibus session example: C",
}
IDENTITIES = {who: Identity.from_seed(_seed(text)) for who, text in SEED_TEXT.items()}
BROKER, ALICE, ECHO, CAROL = (IDENTITIES[w] for w in ("broker", "A", "B", "C"))


def ephemeral_text(role: str, identity: Identity, n: int) -> str:
    return f"minibus session example: ephemeral {role} {identity.id} {n}"


# -- fixed ephemeral keys ----------------------------------------------------------------------


@contextmanager
def fixed_ephemeral_keys() -> Iterator[dict[bytes, bytes]]:
    """For the duration, every shs1 handshake built by ``bus.io.secure`` gets its ephemeral
    secret from :func:`ephemeral_text` (the n-th handshake of that role and identity).

    Yields a dict from each ephemeral public key used to its secret."""
    used: dict[bytes, bytes] = {}
    counts: dict[tuple[str, str], int] = {}

    def secret(role: str, identity: Identity) -> bytes:
        n = counts.get((role, identity.id), 0)
        counts[(role, identity.id)] = n + 1
        value = hashlib.sha256(ephemeral_text(role, identity, n).encode()).digest()
        used[sodium.crypto_scalarmult_base(value)] = value
        return value

    class FixedClient(ClientHandshake):
        def __init__(
            self,
            identity: Identity,
            server_key: PublicKey,
            network_key: bytes = DEFAULT_NETWORK_KEY,
            *,
            ephemeral_secret: bytes | None = None,
        ) -> None:
            super().__init__(
                identity, server_key, network_key, ephemeral_secret=ephemeral_secret or secret("client", identity)
            )

    class FixedServer(ServerHandshake):
        def __init__(
            self,
            identity: Identity,
            network_key: bytes = DEFAULT_NETWORK_KEY,
            *,
            authorize: Callable[[PublicKey], bool] | None = None,
            ephemeral_secret: bytes | None = None,
        ) -> None:
            super().__init__(
                identity, network_key, authorize=authorize, ephemeral_secret=ephemeral_secret or secret("server", identity)
            )

    names = ("ClientHandshake", "ServerHandshake")
    saved = [getattr(secure_module, name) for name in names]
    for name, replacement in zip(names, (FixedClient, FixedServer)):
        setattr(secure_module, name, replacement)
    try:
        yield used
    finally:
        for name, original in zip(names, saved):
            setattr(secure_module, name, original)


# -- recording ---------------------------------------------------------------------------------


@dataclass
class Chunk:
    conn: int  # the connection, in the order the broker accepted them
    inbound: bool  # True: the broker read it (the client wrote it); False: the broker wrote it
    data: bytes  # b"" inbound: the client closed the connection
    step: int


@dataclass
class Step:
    title: str
    text: str


@dataclass
class Transcript:
    chunks: list[Chunk] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # transport of each connection
    recording: bool = True

    def step(self, title: str, text: str) -> None:
        self.steps.append(Step(title, text))

    def record(self, conn: int, inbound: bool, data: bytes) -> None:
        if self.recording:
            self.chunks.append(Chunk(conn, inbound, data, len(self.steps) - 1))


class _Tap(trio.abc.HalfCloseableStream):
    """The broker's side of one accepted socket: records what passes, reads only when idle.

    It has no ``socket`` attribute, so the broker's writer writes through
    :meth:`send_some_nowait` (synchronously, in the order the broker produces frames); reads
    wait until every task is idle (this connection's turn: lower numbers first)."""

    def __init__(self, inner: trio.SocketStream, conn: int, transcript: Transcript) -> None:
        self._inner = inner
        self._fd = inner.socket.fileno()
        self._conn = conn
        self._transcript = transcript
        self._cushion = 0.002 * (conn + 1)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = 1 << 16 if max_bytes is None else max_bytes
        while True:
            await trio.testing.wait_all_tasks_blocked(self._cushion)
            try:
                data = os.read(self._fd, size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._inner.socket)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket error: {exc}") from exc
            self._transcript.record(self._conn, True, data)
            return data

    def send_some_nowait(self, data: bytes | bytearray | memoryview) -> int:
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc
        self._transcript.record(self._conn, False, bytes(data[:sent]))
        return sent

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._transcript.record(self._conn, False, bytes(data))
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()


class _RecordingBroker(Broker):
    """The real broker, with a tap on every connection and a fixed clock, pid and uid."""

    def __init__(self, config: BrokerConfig, transcript: Transcript) -> None:
        super().__init__(config)
        self.core._clock = lambda: CONNECTED_SINCE
        self._transcript = transcript

    async def _handle(
        self, transport: trio.SocketStream, kind: str, pid: int | None, uid: int | None, *rest: Any
    ) -> None:
        conn = len(self._transcript.kinds)
        self._transcript.kinds.append(kind)
        tap = _Tap(transport, conn, self._transcript)
        unix = kind == "unix"
        await super()._handle(tap, kind, PEER_PID if unix else None, PEER_UID if unix else None, *rest)  # type: ignore[arg-type]


# -- the session -------------------------------------------------------------------------------


async def _idle() -> None:
    """Until every task (the broker's readers included) has been idle for a while."""
    await trio.testing.wait_all_tasks_blocked(0.05)


async def _run(tmp: Path) -> tuple[Transcript, dict[bytes, bytes]]:
    transcript = Transcript()
    policy = Policy.from_mapping(
        BROKER.public_key,
        {
            "rule": [
                {
                    "name": "example",
                    "identities": [ALICE.id, ECHO.id, CAROL.id],
                    "connect": True,
                    "own": ["org.example.*"],
                    "see": ["org.example.*"],
                    "open": ["org.example.*"],
                }
            ]
        },
    )
    config = BrokerConfig(
        identity=BROKER,
        policy=policy,
        unix_path=tmp / "run" / "bus.sock",
        tcp=("127.0.0.1", 0),
        runtime_dir=tmp / "run",
        limits=Limits(relay_credit=RELAY_CREDIT),
        keepalive_interval=3600.0,
        keepalive_timeout=7200.0,
        write_address_file=False,
    )
    with fixed_ephemeral_keys() as ephemeral:
        broker = _RecordingBroker(config, transcript)
        async with trio.open_nursery() as nursery:
            address = await nursery.start(broker.serve)
            unix_address, tcp_address = address.split(";")
            await _session(transcript, unix_address, tcp_address)
            nursery.cancel_scope.cancel()
    return transcript, ephemeral


async def _echo(channel: Channel) -> None:
    while data := await channel.receive_some():
        await channel.send_all(data)


async def _session(t: Transcript, unix_address: str, tcp_address: str) -> None:
    t.step("A connects over the Unix socket: shs1, then hello", STEP_TEXT["connect"])
    async with open_bus(unix_address, identity=ALICE, reconnect=False) as bus_a:
        await _idle()
        t.step("A watches org.example.*", STEP_TEXT["watch"])
        async with bus_a.watch(["org.example.*"]) as watch:
            await _idle()
            t.step("B connects and registers org.example.Echo; A hears of it", STEP_TEXT["register"])
            info = {"description": "echoes what it reads", "version": "1.0", "metadata": {}}
            async with open_bus(unix_address, identity=ECHO, name=NAME, info=info, reconnect=False) as bus_b:
                bus_b.handle_channels("raw", _echo, window=WINDOW)
                await _idle()
                event = await watch.__anext__()
                assert (event.kind, event.name) == ("connected", NAME), event
                t.step("A opens a relayed channel to B", STEP_TEXT["open"])
                channel = await bus_a.open_channel(NAME, "raw", "relay", window=WINDOW)
                assert channel.route == "relay" and not channel.encrypted
                await _idle()
                t.step("A sends a line, B echoes it", STEP_TEXT["data"])
                await channel.send_all(LINE)
                echoed = b""
                while len(echoed) < len(LINE):
                    echoed += await channel.receive_some()
                assert echoed == LINE
                await _idle()
                t.step("A ends its direction; B's handler returns and closes the channel", STEP_TEXT["end"])
                await channel.send_eof()
                assert await channel.receive_some() == b""
                await channel.aclose()
                await _idle()
                t.step("B leaves; A hears of it", STEP_TEXT["leave"])
            await _idle()
            event = await watch.__anext__()
            assert (event.kind, event.name) == ("disconnected", NAME), event
            t.step("A unwatches and leaves", STEP_TEXT["unwatch"])
        await _idle()
    await _idle()
    t.step("C connects over TCP: box-stream", STEP_TEXT["tcp"])
    async with open_bus(tcp_address, identity=CAROL, reconnect=False):
        await _idle()
        t.recording = False  # the rest of C's session is boxed the same way


# -- rendering: CBOR -----------------------------------------------------------------------------


def _head(data: bytes, pos: int) -> tuple[int, int, int, int]:
    """(major type, additional info, argument, position after the head)."""
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    if info < 24:
        return major, info, info, pos + 1
    size = 1 << (info - 24)
    return major, info, int.from_bytes(data[pos + 1 : pos + 1 + size], "big"), pos + 1 + size


def _float(info: int, raw: bytes) -> float:
    value: float = struct.unpack({25: ">e", 26: ">f", 27: ">d"}[info], raw)[0]
    return value


def render_cbor(data: bytes) -> tuple[list[tuple[str, str]], str]:
    """Annotated hex of one CBOR item in minibus's profile: ``(hex, comment)`` lines, and
    its diagnostic notation (RFC 8949, section 8) on one line."""
    lines: list[tuple[str, str]] = []

    def item(pos: int, depth: int) -> tuple[int, str]:
        major, info, arg, end = _head(data, pos)
        head = data[pos:end]
        head_hex = head[:1].hex() + (" " + head[1:].hex() if len(head) > 1 else "")
        pad = "  " * depth
        if major == 0:
            lines.append((pad + head_hex, f"unsigned {arg}"))
            return end, str(arg)
        if major == 1:
            lines.append((pad + head_hex, f"negative {-1 - arg}"))
            return end, str(-1 - arg)
        if major in (2, 3):
            content = data[end : end + arg]
            if major == 3:
                diag = json.dumps(content.decode("utf-8"), ensure_ascii=False)
                kind = f"text({arg})"
            else:
                diag = f"h'{content.hex()}'"
                kind = f"bytes({arg})"
            if arg <= 12:
                lines.append((pad + head_hex + (" " + content.hex() if arg else ""), diag if major == 3 else kind))
            else:
                lines.append((pad + head_hex, kind))
                for i in range(0, arg, 16):
                    lines.append((pad + "   " + content[i : i + 16].hex(), diag if i == 0 and major == 3 else ""))
            return end + arg, diag
        if major == 4:
            lines.append((pad + head_hex, f"array({arg})"))
            parts = []
            for _ in range(arg):
                end, part = item(end, depth + 1)
                parts.append(part)
            return end, "[" + ", ".join(parts) + "]"
        if major == 5:
            lines.append((pad + head_hex, f"map({arg})"))
            parts = []
            for _ in range(arg):
                end, key = item(end, depth + 1)
                end, value = item(end, depth + 1)
                parts.append(f"{key}: {value}")
            return end, "{" + ", ".join(parts) + "}"
        if major == 7 and info in (20, 21, 22):
            word = {20: "false", 21: "true", 22: "null"}[info]
            lines.append((pad + head_hex, word))
            return end, word
        if major == 7 and info in (25, 26, 27):
            number = _float(info, head[1:])
            lines.append((pad + head_hex, f"float{8 * (len(head) - 1)} {number!r}"))
            return end, repr(number)
        raise ValueError(f"not in minibus's CBOR profile: initial byte 0x{head[0]:02x}")

    end, diag = item(0, 0)
    if end != len(data):
        raise ValueError(f"{len(data) - end} bytes after the CBOR item")
    return lines, diag


def cbor_diagnostic(data: bytes, width: int = 88) -> str:
    """Diagnostic notation, one item per line where a line would be longer than ``width``."""

    def pretty(pos: int, indent: int) -> tuple[int, str]:
        major, _info, arg, end = _head(data, pos)
        if major not in (4, 5) or not arg:
            stop, flat = _flat(pos)
            return stop, flat
        stop, flat = _flat(pos)
        if indent + len(flat) <= width:
            return stop, flat
        inner = " " * (indent + 2)
        parts = []
        for _ in range(arg):
            if major == 5:
                end, key = _flat(end)
                end, value = pretty(end, indent + 2)
                parts.append(f"{inner}{key}: {value}")
            else:
                end, value = pretty(end, indent + 2)
                parts.append(inner + value)
        open_, close = ("{", "}") if major == 5 else ("[", "]")
        return end, open_ + "\n" + ",\n".join(parts) + "\n" + " " * indent + close

    def _flat(pos: int) -> tuple[int, str]:
        # The one-line form of the item at pos, and where it ends.
        stop = _skip(data, pos)
        return stop, render_cbor(data[pos:stop])[1]

    end, text = pretty(0, 0)
    assert end == len(data)
    return text


def _skip(data: bytes, pos: int) -> int:
    major, _info, arg, end = _head(data, pos)
    if major in (2, 3):
        return end + arg
    if major in (4, 5):
        for _ in range(arg * (2 if major == 5 else 1)):
            end = _skip(data, end)
    return end


# -- rendering: blocks ---------------------------------------------------------------------------


def _block(kind: str, lines: list[tuple[str, str]]) -> str:
    width = max(len(h) for h, _ in lines) + 2
    body = "\n".join((h.ljust(width) + "# " + c) if c else h for h, c in lines)
    return f"```{kind}\n{body}\n```\n"


def _hex_lines(data: bytes, comments: list[tuple[int, int, str]] | None = None, indent: str = "") -> list[tuple[str, str]]:
    """Hex in lines of 16 bytes; ``comments``: (start, end, text) ranges, each on its own lines."""
    ranges = comments or [(0, len(data), "")]
    lines: list[tuple[str, str]] = []
    for start, stop, text in ranges:
        for i in range(start, stop, 16):
            lines.append((indent + data[i : min(i + 16, stop)].hex(), text if i == start else ""))
    return lines


def _printable(data: bytes) -> str:
    text = data.decode("latin-1")
    if all(32 <= ord(c) < 127 or c == "\n" for c in text):
        return json.dumps(text)
    return ""


SHS_PARTS = {
    1: [(0, 32, "hmac(N, a_pub)"), (32, 64, "a_pub: the client's ephemeral key")],
    2: [(0, 32, "hmac(N, b_pub)"), (32, 64, "b_pub: the server's ephemeral key")],
    3: [(0, 112, "box(sig_A ‖ A_pub, 0²⁴, sha256(N ‖ ab ‖ aB))")],
    4: [(0, 80, "box(sig_B, 0²⁴, sha256(N ‖ ab ‖ aB ‖ Ab))")],
}
SHS_NAMES = {1: "msg1 (client hello)", 2: "msg2 (server hello)", 3: "msg3 (client authenticate)", 4: "msg4 (server accept)"}


def _frame_lines(raw: bytes, shs: int | None = None) -> tuple[list[tuple[str, str]], str | None]:
    kind, flags, channel, length = HEADER.unpack_from(raw)
    body = raw[HEADER.size :]
    what = {1: "CONTROL", 2: "DATA"}[kind]
    header = (f"{raw[0]:02x} {raw[1]:02x} {raw[2:6].hex()} {raw[6:10].hex()}", f"{what}, flags {flags}, channel {channel}, {length}-byte body")
    if kind == 1:
        lines, _ = render_cbor(body)
        return [header, *lines], cbor_diagnostic(body)
    if shs is not None:
        parts = [(a, b, f"channel shs1 msg{shs}: {t}") for a, b, t in SHS_PARTS[shs]]
        return [header, *_hex_lines(body, parts)], None
    return [header, *_hex_lines(body, [(0, len(body), _printable(body))])], None


def _caption(frame: ControlFrame | DataFrame, shs: int | None) -> str:
    if isinstance(frame, DataFrame):
        if shs is not None:
            return f"DATA on channel {frame.channel}: the channel's own shs1 {SHS_NAMES[shs]}"
        return f"DATA on channel {frame.channel}: {len(frame.data)} bytes of the channel's stream"
    m = frame.message
    if frame.channel:
        key = next(iter(m))
        return f"CONTROL on channel {frame.channel}: `{key}`"
    if "op" in m:
        return f"request `{m['op']}`, id {m['id']}"
    if "re" in m:
        return f"{'error ' if 'error' in m else ''}reply to request {m['re']}"
    return f"event `{m['event']}`"


# -- rendering: the document ---------------------------------------------------------------------


LABELS = ["A", "B", "C"]
#: The relayed channel's own handshake: which end is its shs1 client, by (connection, channel).
CHANNEL_CLIENT = {(0, 1): True, (1, 1): False}


@dataclass
class _Direction:
    """What is known of one direction of one connection while its bytes are cut up."""

    inbound: bool
    shs_left: list[int]
    buffer: bytearray = field(default_factory=bytearray)
    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(max_items=4096))
    channel_bytes: dict[int, int] = field(default_factory=dict)  # DATA bytes seen per channel


def _arrow(conn: int, inbound: bool) -> str:
    return f"{LABELS[conn]} → broker" if inbound else f"broker → {LABELS[conn]}"


def _channel_shs(direction: _Direction, conn: int, channel: int, size: int) -> int | None:
    """Which message of the channel's own handshake a DATA frame carries, if any."""
    seen = direction.channel_bytes.get(channel, 0)
    direction.channel_bytes[channel] = seen + size
    client = CHANNEL_CLIENT.get((conn, channel))
    if client is None:
        return None
    # The client end writes msg1 (64) and msg3 (112); the server end msg2 (64) and msg4 (80).
    writes_client_messages = client == direction.inbound
    sizes = [(1, 64), (3, 112)] if writes_client_messages else [(2, 64), (4, 80)]
    offset = 0
    for number, length in sizes:
        if seen == offset and size == length:
            return number
        offset += length
    return None


def _render_frame(direction: _Direction, conn: int, raw: bytes, frame: ControlFrame | DataFrame) -> str:
    shs = None
    if isinstance(frame, DataFrame):
        shs = _channel_shs(direction, conn, frame.channel, len(frame.data))
    lines, diag = _frame_lines(raw, shs)
    out = f"**{_arrow(conn, direction.inbound)}** · {_caption(frame, shs)}\n\n{_block('frame', lines)}"
    if diag is not None:
        out += f"\n```cbor-diag\n{diag}\n```\n"
    return out + "\n"


def _cut_frames(direction: _Direction, conn: int, data: bytes) -> list[str]:
    """The frames this chunk completes, rendered."""
    out = []
    direction.buffer += data
    direction.decoder.receive_data(data)
    while (frame := direction.decoder.next_frame()) is not None:
        _, _, _, length = HEADER.unpack_from(direction.buffer)
        raw = bytes(direction.buffer[: HEADER.size + length])
        del direction.buffer[: HEADER.size + length]
        out.append(_render_frame(direction, conn, raw, frame))
    return out


def _render_shs(conn: int, inbound: bool, number: int, message: bytes) -> str:
    return f"**{_arrow(conn, inbound)}** · shs1 {SHS_NAMES[number]}, {len(message)} bytes\n\n" + _block(
        "shs1", _hex_lines(message, SHS_PARTS[number])
    ) + "\n"


def render(transcript: Transcript, ephemeral: dict[bytes, bytes]) -> str:
    parts = [INTRO.format(**_intro_values())]
    directions: dict[tuple[int, bool], _Direction] = {}
    handshakes: dict[int, dict[int, bytes]] = {}
    boxed: dict[int, _BoxedConnection] = {}
    current = -1
    for chunk in transcript.chunks:
        while current < chunk.step:
            current += 1
            step = transcript.steps[current]
            parts.append(f"## {current + 1}. {step.title}\n\n{step.text}\n")
        key = (chunk.conn, chunk.inbound)
        direction = directions.get(key)
        if direction is None:
            direction = directions[key] = _Direction(chunk.inbound, [1, 3] if chunk.inbound else [2, 4])
        if not chunk.data:
            parts.append(f"**{LABELS[chunk.conn]} closes the connection** (the broker reads the end of the stream; no frame).\n\n")
            continue
        data = chunk.data
        while direction.shs_left and data:
            number = direction.shs_left[0]
            want = {1: 64, 2: 64, 3: 112, 4: 80}[number] - len(direction.buffer)
            direction.buffer += data[:want]
            data = data[want:]
            if len(direction.buffer) == {1: 64, 2: 64, 3: 112, 4: 80}[number]:
                message = bytes(direction.buffer)
                direction.buffer.clear()
                direction.shs_left.pop(0)
                handshakes.setdefault(chunk.conn, {})[number] = message
                parts.append(_render_shs(chunk.conn, chunk.inbound, number, message))
                if number == 4 and transcript.kinds[chunk.conn] == "tcp":
                    connection = _BoxedConnection(chunk.conn, handshakes[chunk.conn], ephemeral)
                    boxed[chunk.conn] = connection
                    parts.append(connection.derivation())
        if not data:
            continue
        if chunk.conn in boxed:
            parts.extend(boxed[chunk.conn].boxes(chunk.inbound, data, direction))
        else:
            parts.extend(_cut_frames(direction, chunk.conn, data))
    for direction in directions.values():
        assert not direction.buffer and not direction.decoder.buffered, "a frame was cut off"
    for connection in boxed.values():
        parts.append(connection.goodbye())
    parts.append(OUTRO)
    return "".join(parts)


def _intro_values() -> dict[str, str]:
    rows = []
    roles = {
        "broker": "the broker (its key is in the bus address)",
        "A": "a nameless client on the Unix socket, `:1`",
        "B": f"a plugin on the Unix socket owning `{NAME}`, `:2`",
        "C": "a nameless client over TCP, `:3`",
    }
    for who, identity in IDENTITIES.items():
        rows.append(f"| {who} | {roles[who]} | `{identity.id}` | SHA-256 of `{SEED_TEXT[who]}` |")
    return {
        "cast": "\n".join(rows),
        "network_key": DEFAULT_NETWORK_KEY.hex(),
        "relay_credit": str(RELAY_CREDIT),
        "window": str(WINDOW),
        "since": repr(CONNECTED_SINCE),
        "pid": str(PEER_PID),
        "uid": str(PEER_UID),
    }


# -- box-stream: recompute the keys from the fixed secrets, open the boxes -------------------------


def _auth(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha512")[:32]


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class _BoxedConnection:
    """A TCP connection: its handshake recomputed with the bare primitives, its boxes opened."""

    def __init__(self, conn: int, messages: dict[int, bytes], ephemeral: dict[bytes, bytes]) -> None:
        self.conn = conn
        n = DEFAULT_NETWORK_KEY
        client, server = CAROL, BROKER
        msg1, msg2, msg3, msg4 = (messages[i] for i in (1, 2, 3, 4))
        a_pub, b_pub = msg1[32:], msg2[32:]
        a, b = ephemeral[a_pub], ephemeral[b_pub]
        assert msg1 == _auth(n, a_pub) + a_pub and msg2 == _auth(n, b_pub) + b_pub
        ab = sodium.crypto_scalarmult(a, b_pub)
        aB = sodium.crypto_scalarmult(a, sodium.crypto_sign_ed25519_pk_to_curve25519(server.public_key.raw))
        Ab = sodium.crypto_scalarmult(sodium.crypto_sign_ed25519_sk_to_curve25519(client.secret_key), b_pub)
        assert ab == sodium.crypto_scalarmult(b, a_pub)
        key3 = _sha256(n + ab + aB)
        sig_a = client.sign(n + server.public_key.raw + _sha256(ab))
        assert msg3 == sodium.crypto_secretbox_easy(sig_a + client.public_key.raw, bytes(24), key3)
        key4 = _sha256(n + ab + aB + Ab)
        sig_b = server.sign(n + sig_a + client.public_key.raw + _sha256(ab))
        assert msg4 == sodium.crypto_secretbox_easy(sig_b, bytes(24), key4)
        shared = _sha256(key4)
        self.keys = {
            True: (_sha256(shared + server.public_key.raw), msg2[:24]),  # client → server
            False: (_sha256(shared + client.public_key.raw), msg1[:24]),  # server → client
        }
        self.values = [
            ("a: C's ephemeral secret", a, ephemeral_text("client", client, 0)),
            ("b: the broker's ephemeral secret", b, ephemeral_text("server", server, 2)),
            ("ab = dh(a, b_pub)", ab, ""),
            ("aB = dh(a, curve(B_pub))", aB, ""),
            ("Ab = dh(curve(A_sk), b_pub)", Ab, ""),
            ("msg3 key = sha256(N ‖ ab ‖ aB)", key3, ""),
            ("sig_A = sign_A(N ‖ B_pub ‖ sha256(ab))", sig_a, ""),
            ("msg4 key = sha256(N ‖ ab ‖ aB ‖ Ab)", key4, ""),
            ("sig_B = sign_B(N ‖ sig_A ‖ A_pub ‖ sha256(ab))", sig_b, ""),
            ("S = sha256(msg4 key)", shared, ""),
            ("C → broker key = sha256(S ‖ B_pub)", self.keys[True][0], ""),
            ("C → broker nonce = msg2[0:24]", self.keys[True][1], ""),
            ("broker → C key = sha256(S ‖ A_pub)", self.keys[False][0], ""),
            ("broker → C nonce = msg1[0:24]", self.keys[False][1], ""),
        ]
        assert a == hashlib.sha256(self.values[0][2].encode()).digest()
        assert b == hashlib.sha256(self.values[1][2].encode()).digest()
        self.nonces = {inbound: int.from_bytes(nonce, "big") for inbound, (_, nonce) in self.keys.items()}
        # Independent check: the library's decoder opens the same bytes to the same frames.
        self.checks = {inbound: BoxStreamDecoder(*self.keys[inbound]) for inbound in (True, False)}
        self.pending: dict[bool, bytearray] = {True: bytearray(), False: bytearray()}

    def derivation(self) -> str:
        lines = []
        for name, value, _text in self.values:
            lines.append((value[:32].hex(), name))
            for i in range(32, len(value), 32):
                lines.append((value[i : i + 32].hex(), ""))
        return (
            "The same handshake, recomputed from the fixed secrets with the bare primitives (in\n"
            "protocol.md's notation A is C and B the broker; `curve()` converts an Ed25519 key to\n"
            "Curve25519). The ephemeral secrets are SHA-256 of these texts:\n\n"
            f"- a: `{self.values[0][2]}`\n"
            f"- b: `{self.values[1][2]}`\n\n"
            + _block("text", lines)
            + "\n"
        )

    def boxes(self, inbound: bool, data: bytes, direction: _Direction) -> list[str]:
        out = []
        self.checks[inbound].receive_data(data)
        plain_check = self.checks[inbound].read()
        buffer = self.pending[inbound]
        buffer += data
        key = self.keys[inbound][0]
        plain = b""
        while len(buffer) >= 34:
            n = self.nonces[inbound]
            header_box = bytes(buffer[:34])
            header = sodium.crypto_secretbox_open_easy(header_box, n.to_bytes(24, "big"), key)
            length, mac = int.from_bytes(header[:2], "big"), header[2:]
            if len(buffer) < 34 + length:
                break
            body = bytes(buffer[34 : 34 + length])
            del buffer[: 34 + length]
            chunk = sodium.crypto_secretbox_open_easy(mac + body, (n + 1).to_bytes(24, "big"), key)
            self.nonces[inbound] = n + 2
            plain += chunk
            out.append(self._render_box(inbound, n, header_box, header, body, chunk, direction))
        assert plain == plain_check
        return out

    def _render_box(
        self, inbound: bool, n: int, header_box: bytes, header: bytes, body: bytes, plain: bytes, direction: _Direction
    ) -> str:
        arrow = _arrow(self.conn, inbound)
        length = int.from_bytes(header[:2], "big")
        text = (
            f"**{arrow}** · one box-stream box: a 34-byte header box and a {length}-byte body\n\n"
            + _block(
                "box",
                [
                    *_hex_lines(header_box, [(0, 34, f"header: box(len ‖ body_mac, n, K), n = {n.to_bytes(24, 'big').hex()}")]),
                    *_hex_lines(body, [(0, len(body), f"body: the ciphertext of box(frame, n+1, K) without its MAC")]),
                ],
            )
            + "\nOpening the header with `n` gives 18 bytes, the body's length and MAC; opening\n"
            "`body_mac ‖ body` with `n+1` gives the plaintext, here one whole frame:\n\n"
            + _block("text", [(header[:2].hex(), f"length {length}"), (header[2:].hex(), "body_mac")])
            + "\n"
        )
        frames = _cut_frames(direction, self.conn, plain)
        return text + "".join(frames)

    def goodbye(self) -> str:
        key, _ = self.keys[True]
        nonce = self.nonces[True].to_bytes(24, "big")
        bye = BoxStreamEncoder(key, nonce).goodbye()
        assert bye == sodium.crypto_secretbox_easy(bytes(18), nonce, key)
        return (
            "C's session goes on the same way, every frame boxed, and is not shown. Had C ended its\n"
            "direction right here, its goodbye would have been the box of 18 zero bytes under the next\n"
            f"header nonce, `{nonce.hex()}` (computed, not recorded):\n\n"
            + _block("box", _hex_lines(bye, [(0, 34, "goodbye: box(0¹⁸, n, K)")]))
            + "\n"
        )


# -- the text ------------------------------------------------------------------------------------

INTRO = """\
# One whole session, byte by byte

<!-- Generated by tools/session_example.py from a real run: do not edit by hand.
     Regenerate with `python -m tools.session_example --write`. -->

This is a real session on a minibus broker: every byte each side wrote, in the order the broker
read and wrote them, from the shs1 handshake to the end. [protocol.md](protocol.md) has the
rules; this page has bytes to check an implementation against.
`tests/test_protocol_example.py` regenerates it and fails when it differs, and decodes every
frame on it with the real frame decoder, so it cannot go stale.

**What happens.** A nameless client **A** connects over the broker's Unix socket and watches
`org.example.*`. A plugin **B** connects and registers `org.example.Echo`; A is told. A opens a
relayed channel to B with the protocol label `raw`; A and B run their own shs1 handshake through
it, A sends a line, B echoes it, A ends its direction, B's handler returns and closes the
channel. B leaves, and A is told; A unwatches and leaves. Last, a client **C** connects over TCP,
where everything after the handshake is box-stream: its first box each way is shown and opened.

| who | what | identity | Ed25519 seed |
| --- | --- | --- | --- |
{cast}

**How to read it.** "A → broker" is what A wrote, "broker → A" what the broker wrote to A (the
broker relays between A and B; the two clients never talk directly). shs1 messages are raw bytes;
frames are annotated hex: on each line, the hex before `#` is the exact bytes (spaces mean
nothing) and the rest a comment, one CBOR item per line, indented by nesting. Each CONTROL body is
shown again in CBOR diagnostic notation (RFC 8949, section 8).

**What was fixed so that every run gives these bytes.** A real peer must not copy any of it.

- The identities come from the seeds above, and the shs1 ephemeral keys are derived from fixed
  text (shown where they are used); a real peer draws a fresh random ephemeral key pair for
  every handshake.
- The broker's clock reads `{since}` for `connected_since` (really `time.time()` at
  the connection), and SO_PEERCRED reports pid {pid} and uid {uid} for both Unix clients.
- The broker runs with `relay_credit = {relay_credit}` and both channel ends use a window of
  {window} bytes, so that credit comes back within the few hundred bytes shown. With the
  defaults, the broker's first grant to each end is 65536 bytes, the client library grants
  524288, and nothing comes back this early ([protocol.md](protocol.md#62-the-relay-route)
  section 6.2).
- Keepalive pings are off (the broker pings a connection idle for 15 s).
- The broker reads from one connection at a time, once every task is idle, so the interleaving
  of A's and B's messages is the same in every run; what each connection carries does not
  depend on it.

The network key is minibus's default, `N = {network_key}`.

"""

OUTRO = """\
## Regenerating

```sh
python -m tools.session_example --write    # after a change to what goes on the wire
python -m pytest tests/test_protocol_example.py
```
"""

STEP_TEXT = {
    "connect": """\
A knows the broker's key from the bus address (`unix:path=…/bus.sock,key=@….ed25519`). The four
shs1 messages have fixed sizes, 64, 64, 112 and 80 bytes, and no framing
([protocol.md](protocol.md#2-the-shs1-secret-handshake) section 2). On a Unix socket the bytes
after the handshake are frames in plain text. A wrote its hello in the same write as msg3, before
msg4 came ([protocol.md](protocol.md#26-the-clients-early-data-hello-behind-msg3) section 2.6);
the broker reads it once it has sent msg4, the order shown here.

The first request on a connection must be `hello`. A asks for no name and sends an empty `info`:
every field of `info` is optional ([protocol.md](protocol.md#51-client--broker-requests) section
5.1). The reply gives A its unique id and the identity the broker saw in the handshake.
""",
    "watch": """\
Request ids are the sender's own: they need only be unique among its requests still waiting for
a reply. The client library numbers its hello 1 and its later requests from 1 again (the hello's
answer has come by then), so this `watch` is request 1 too. The broker's requests to a
connection (`ping`, and `channel_request` below) have ids of their own, counted per connection
and unrelated to the client's: a reply's `re` always names a request its receiver sent.

A's watch has no match yet: an empty first page, and `more: false` says no page follows.
""",
    "register": """\
B's handshake is A's with other keys. Its hello asks for a name; the reply's `name_result` is
what `request_name` would have answered (`primary-owner` here). The broker sends B its reply
before the event the hello causes for A. In the `name` event, `owner` is the new owner's entry
(null when the name has no owner now), while `old_owner` is only a unique id (null when the name
had no owner) and `old_identity` that owner's key.
""",
    "open": f"""\
A asks for route `relay` (both clients are on the Unix socket, so `auto` would have taken
`unix-fd`). The broker asks B with a `channel_request`, request 1 of the broker's to B, naming
the channel by B's own channel id. B accepts with `{{}}` and, from that moment, knows its channel
1: its first frame on it is its own credit grant, the window it will read ({WINDOW} bytes here).
The broker then answers A, and right behind that reply sends each end its first credit on its
own channel id: `min(65536, relay_credit)`, {RELAY_CREDIT} bytes here. A registers its channel id
while handling the reply (the grant follows right behind it) and grants its own window too.

Nothing is relayed to an end that has granted no credit: each end's first `{{"credit": n}}` is
what lets the other send ([protocol.md](protocol.md#62-the-relay-route) section 6.2). Both
`encrypted` fields are false (every hop is a local socket), so after its handshake the channel
carries plain bytes.

Then the channel's own shs1 runs in DATA frames: A is the client and knows B's key from
`peer.identity` in the reply, B accepts only the key in `opener.identity` of its request, and both
use the bus's network key `N`. Credit moves as it goes: once the broker has passed on half of a
direction's cap (here {RELAY_CREDIT // 2} bytes: after A's msg3, after B's msg4) it returns to
that sender the credit of all it passed on, and a receiver that has read half its window grants
what it read.
""",
    "data": """\
Channel bytes travel in DATA frames on each end's own channel id. Neither end sends more than the
credit it holds; these few bytes leave both with enough, and no credit comes back.
""",
    "end": """\
A's `{"eof": true}` ends its direction; the broker passes it on behind A's data. B reads the end,
its handler returns, and the client library closes B's end: `{"close": true}`. The broker tells A
at once (`{"closed": true}`: A's sends would now be dropped), delivers what B had sent, then B's
end of stream (`{"eof": true}`), and frees the channel. A's own close then sends nothing: the
broker has already forgotten the channel. (On an encrypted relay, A's end would be box-stream's
goodbye in a DATA frame instead of `{"eof": true}`, and B's close the goodbye, then
`{"close": true}`.)
""",
    "leave": """\
On a plain Unix connection the end is the transport's end of stream: B just closes its socket
(on TCP, box-stream's goodbye should come first, protocol.md section 3). The broker releases B's
name, and A's watch hears of it.
""",
    "unwatch": """\
A drops its watch (the client library does not wait for this reply) and closes its socket.
""",
    "tcp": """\
Over TCP the handshake is the same, and everything after msg4 is box-stream
([protocol.md](protocol.md#3-box-stream) section 3), each direction with its own key and nonce
from the handshake.
""",
}


# -- entry points ----------------------------------------------------------------------------------


async def generate() -> str:
    """Run the session and return the document."""
    with tempfile.TemporaryDirectory(prefix="minibus-example-") as tmp:
        transcript, ephemeral = await _run(Path(tmp))
    return render(transcript, ephemeral)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"rewrite {DOCUMENT.relative_to(ROOT)}")
    group.add_argument("--check", action="store_true", help=f"exit 1 if {DOCUMENT.relative_to(ROOT)} is stale")
    args = parser.parse_args(argv)
    text = trio.run(generate)
    if args.write:
        DOCUMENT.write_text(text, encoding="utf-8")
        return 0
    if args.check:
        current = DOCUMENT.read_text(encoding="utf-8") if DOCUMENT.exists() else ""
        if current != text:
            print(f"{DOCUMENT.relative_to(ROOT)} is stale: run python -m tools.session_example --write", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
