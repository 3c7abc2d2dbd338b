"""``busctl``: look at and talk to a minibus from the command line.

One function per verb, one helper that connects, arguments checked before connecting, and
exit codes scripts can rely on (see ``busctl --help``).  Everything goes through the public
client library; no protocol logic lives here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import trio

from . import (
    AccessDenied,
    ChannelRejected,
    Bus,
    BusError,
    CannotConnect,
    ConnectionLost,
    HandshakeError,
    Identity,
    KeyFileError,
    NameEvent,
    NameInfo,
    NameNotFound,
    RequestError,
    RequestTimeout,
    load_identity,
    load_or_create_identity,
    open_bus,
    parse_network_key,
    save_identity,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_DENIED = 4
EXIT_NOT_FOUND = 5
EXIT_REMOTE = 6

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}  success
  {EXIT_ERROR}  other error (a bad key file, an interrupted connection)
  {EXIT_USAGE}  usage error (bad arguments)
  {EXIT_CONNECT}  cannot connect to the bus (no address, nothing listening, handshake refused)
  {EXIT_DENIED}  denied by the bus's policy
  {EXIT_NOT_FOUND}  not found (no such name or connection; 'wait' timed out)
  {EXIT_REMOTE}  any other error reported by the bus

environment:
  MINIBUS_ADDRESS      the bus address when --address is not given (else the broker's address file)
  MINIBUS_NETWORK_KEY  the network key (hex) when --network-key is not given
"""


class Failure(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="busctl",
        description="Inspect and use a minibus: list plugins, watch them come and go, wait for one.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--address", metavar="A", help="bus address (default: MINIBUS_ADDRESS, else the address file)")
    p.add_argument("--identity", metavar="FILE", help="key file to connect as (default: your key, created on first use)")
    p.add_argument("--network-key", metavar="HEX", help="network key, 64 hex digits (default: MINIBUS_NETWORK_KEY or minibus's own)")
    p.add_argument("--timeout", metavar="S", type=float, default=10.0, help="deadline in seconds for connecting, each request, and 'wait' (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON (one object per line for 'monitor')")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    v = verbs.add_parser("list", help="list the named plugins on the bus")
    v.add_argument("--all", action="store_true", help="also nameless connections (admin identities only)")
    v = verbs.add_parser("status", help="show one connection, by well-known name or unique id (:42)")
    v.add_argument("target", metavar="NAME|ID")
    v = verbs.add_parser("monitor", help="print named plugins as they connect and disconnect, until interrupted")
    v.add_argument("patterns", metavar="PATTERN", nargs="*", help="name patterns such as 'org.example.*' (default: all)")
    v = verbs.add_parser("wait", help="wait until NAME is on the bus (up to --timeout), print its owner")
    v.add_argument("name", metavar="NAME")
    v = verbs.add_parser("call", help="call METHOD of the service owning NAME; arguments and result are JSON")
    v.add_argument("name", metavar="NAME")
    v.add_argument("method", metavar="METHOD")
    v.add_argument("args", metavar="ARG", nargs="*", help="one JSON value per argument, e.g. 3 '\"text\"' '[1,2]'")
    v = verbs.add_parser("introspect", help="show the methods (parameters, doc text) and protocols of a service")
    v.add_argument("name", metavar="NAME")
    v = verbs.add_parser("open", help="pipe stdin and stdout through a channel, like netcat (EOF on stdin half-closes)")
    v.add_argument("name", metavar="NAME")
    v.add_argument("--protocol", default="raw", metavar="LABEL", help="the channel's protocol label (default: raw)")
    v.add_argument(
        "--route",
        default="auto",
        choices=["auto", "relay", "direct"],
        help="how the bytes travel: direct (a socket passed by the broker; both ends on its Unix socket), "
        "relay (through the broker), auto (direct when possible, else relay; the default)",
    )
    verbs.add_parser("id", help="print the identity busctl connects as")
    v = verbs.add_parser("keygen", help="create a new identity key file (mode 0600)")
    v.add_argument("file", metavar="FILE")
    return p


# -- output ----------------------------------------------------------------------------------


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _jsonable(value: Any) -> Any:
    """CBOR allows integer map keys (and bytes); JSON wants text keys."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


def _json(value: Any) -> None:
    _out(json.dumps(_jsonable(value), sort_keys=True, default=str))


def _safe(text: str) -> str:
    """What a plugin chose to say, made harmless for a terminal (no control characters)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _since(ts: float) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    _out("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in rows:
        _out("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


# -- connecting ------------------------------------------------------------------------------


def _identity(args: argparse.Namespace) -> Identity:
    try:
        return load_identity(args.identity) if args.identity else load_or_create_identity()
    except KeyFileError as exc:
        raise Failure(str(exc), EXIT_ERROR) from exc


@asynccontextmanager
async def _connect(args: argparse.Namespace) -> AsyncIterator[Bus]:
    identity = _identity(args)
    try:
        network_key = parse_network_key(args.network_key) if args.network_key else None
    except ValueError as exc:
        raise Failure(f"--network-key: {exc}", EXIT_USAGE) from exc
    try:
        async with open_bus(
            args.address,
            identity=identity,
            network_key=network_key,
            reconnect=False,
            request_timeout=args.timeout,
            connect_timeout=args.timeout,
        ) as bus:
            yield bus
    except (CannotConnect, HandshakeError, OSError) as exc:
        raise Failure(str(exc), EXIT_CONNECT) from exc


# -- verbs -----------------------------------------------------------------------------------


async def verb_list(args: argparse.Namespace) -> None:
    async with _connect(args) as bus:
        entries = await bus.list_names(all=args.all)
    if args.json:
        _json([e.to_json() for e in entries])
        return
    rows = [
        [
            e.name or "-",
            e.unique_id,
            e.identity,
            e.transport,
            str(e.pid) if e.pid is not None else "-",
            _since(e.connected_since),
            _safe(str(e.info.get("description", ""))) or "-",
        ]
        for e in entries
    ]
    _table(rows, ["NAME", "UNIQUE-ID", "IDENTITY", "TRANSPORT", "PID", "SINCE", "DESCRIPTION"])


async def verb_status(args: argparse.Namespace) -> None:
    async with _connect(args) as bus:
        entry = await bus.info(args.target)
    if args.json:
        _json(entry.to_json())
        return
    fields = [
        ("unique id", entry.unique_id),
        ("identity", entry.identity),
        ("names", ", ".join(entry.names) or "-"),
        ("queued for", ", ".join(entry.queued_for) or "-"),
        ("transport", entry.transport),
        ("pid", str(entry.pid) if entry.pid is not None else "-"),
        ("uid", str(entry.uid) if entry.uid is not None else "-"),
        ("connected since", _since(entry.connected_since)),
        ("description", _safe(str(entry.info.get("description", ""))) or "-"),
        ("version", _safe(str(entry.info.get("version", ""))) or "-"),
        ("metadata", _safe(json.dumps(_jsonable(entry.info.get("metadata", {})), sort_keys=True, default=str))),
    ]
    for key, value in fields:
        _out(f"{key + ':':17}{_safe(value)}")
    for ch in entry.channels:
        if "bytes_in" in ch:
            counted = f"{ch.get('bytes_in')} bytes in, {ch.get('bytes_out')} bytes out"
            if ch.get("route") != "relay":
                counted += " (as its end last reported)"
        else:
            counted = "bytes not reported yet"
        _out(
            _safe(
                f"{'channel:':17}{ch.get('channel')} {ch.get('protocol')} via {ch.get('route')} with {ch.get('peer')} "
                f"(opened by {ch.get('opened_by')}), {counted}"
            )
        )


def _event_line(ev: NameEvent) -> str:
    owner = ev.owner
    if owner is None:
        return _safe(f"{ev.kind:13} {ev.name} (was {ev.old_owner})")
    return _safe(f"{ev.kind:13} {ev.name} {owner.unique_id} {owner.identity}")


async def verb_monitor(args: argparse.Namespace) -> None:
    async with _connect(args) as bus, bus.watch(args.patterns or ["*"]) as watch:
        async for ev in watch:
            if args.json:
                _json(ev.to_json())
            else:
                _out(_event_line(ev))


async def verb_wait(args: argparse.Namespace) -> None:
    found: NameInfo | None = None
    with trio.move_on_after(args.timeout):
        async with _connect(args) as bus, bus.watch([args.name]) as watch:
            async for ev in watch:
                if ev.name == args.name and ev.owner is not None:
                    found = ev.owner
                    break
    if found is None:
        raise Failure(f"{args.name} did not appear within {args.timeout:g} s", EXIT_NOT_FOUND)
    if args.json:
        _json(found.to_json())
    else:
        _out(found.unique_id)


def _json_args(texts: list[str]) -> list[Any]:
    values = []
    for text in texts:
        try:
            values.append(json.loads(text))
        except ValueError as exc:
            raise Failure(f"argument {text!r} is not JSON ({exc}); quote strings, e.g. '\"text\"'", EXIT_USAGE) from None
    return values


async def verb_call(args: argparse.Namespace) -> None:
    values = _json_args(args.args)
    async with _connect(args) as bus:
        result = await bus.call(args.name, args.method, *values)
    _json(result)


async def verb_introspect(args: argparse.Namespace) -> None:
    async with _connect(args) as bus:
        described = await bus.introspect(args.name)
    if args.json:
        _json(described)
        return
    _out(_safe(f"{described.get('name')}: {described.get('info', {}).get('description', '')}"))
    _out(_safe(f"protocols: {', '.join(described.get('protocols', []))}"))
    for method in described.get("methods", []):
        params = ", ".join(
            p["name"] + (f": {p['type']}" if "type" in p else "") + (f" = {p['default']}" if "default" in p else "")
            for p in method.get("params", [])
        )
        _out(_safe(f"  {method['name']}({params})"))
        for line in str(method.get("doc", "")).splitlines():
            _out(_safe(f"      {line}"))


async def verb_open(args: argparse.Namespace) -> None:
    async with _connect(args) as bus:
        channel = await bus.open_channel(args.name, args.protocol, args.route)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        stdout = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
        sys.stdout.flush()
        async with channel, stdin, stdout:

            async def upstream() -> None:
                while data := await stdin.receive_some(65536):
                    await channel.send_all(data)
                await channel.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(upstream)
                while data := await channel.receive_some(65536):
                    await stdout.send_all(data)


async def verb_id(args: argparse.Namespace) -> None:
    identity = _identity(args)
    if args.json:
        _json({"identity": identity.id})
    else:
        _out(identity.id)


async def verb_keygen(args: argparse.Namespace) -> None:
    identity = Identity.generate()
    try:
        save_identity(args.file, identity)
    except KeyFileError as exc:
        raise Failure(str(exc), EXIT_ERROR) from exc
    if args.json:
        _json({"identity": identity.id, "file": args.file})
    else:
        _out(identity.id)


VERBS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, None]]] = {
    "list": verb_list,
    "status": verb_status,
    "monitor": verb_monitor,
    "wait": verb_wait,
    "call": verb_call,
    "introspect": verb_introspect,
    "open": verb_open,
    "id": verb_id,
    "keygen": verb_keygen,
}


def _exit_code(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, Failure):
        return exc.code, str(exc)
    if isinstance(exc, AccessDenied):
        return EXIT_DENIED, exc.message
    if isinstance(exc, NameNotFound):
        return EXIT_NOT_FOUND, exc.message
    if isinstance(exc, ChannelRejected):
        return EXIT_REMOTE, exc.message
    if isinstance(exc, RequestError):
        return EXIT_REMOTE, str(exc)
    if isinstance(exc, RequestTimeout):
        return EXIT_CONNECT, str(exc)
    if isinstance(exc, (ConnectionLost, BusError)):
        return EXIT_ERROR, str(exc)
    raise exc


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        print("busctl: --timeout must be a positive number of seconds", file=sys.stderr)
        return EXIT_USAGE
    try:
        trio.run(VERBS[args.verb], args)
    except KeyboardInterrupt:
        return EXIT_OK if args.verb == "monitor" else 130
    except (BusError, Failure) as exc:
        code, message = _exit_code(exc)
        print(f"busctl: {message}", file=sys.stderr)
        return code
    except BaseExceptionGroup as group:
        errors = [e for e in group.exceptions if isinstance(e, (BusError, Failure))]
        if not errors:
            raise
        code, message = _exit_code(errors[0])
        print(f"busctl: {message}", file=sys.stderr)
        return code
    except BrokenPipeError:
        return EXIT_OK
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        print(f"busctl: the channel broke: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
