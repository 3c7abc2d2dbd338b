"""``busctl``: look at and talk to a minibus from the command line.

One function per verb, one helper that connects, arguments checked before connecting, and
exit codes scripts can rely on (see ``busctl --help``).  Everything goes through the public
client library; no protocol logic lives here.

Global options go before or after the verb (``busctl --json list`` or ``busctl list --json``),
as with systemd's busctl.  Whatever the input, a failure is one line on stderr and a
documented exit code, never a traceback.  SIGINT and SIGTERM end a verb cleanly (its bus
connection says goodbye) with 130 and 143; ``monitor``, which runs until stopped, with 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from types import FrameType
from typing import Any, NoReturn

import trio

from bus import __version__
from bus.core.broker import CHANNEL_PROTOCOL_RE
from bus.core.glob import GlobError, compile_glob
from bus.core.names import validate_name

from . import (
    AccessDenied,
    BadRequest,
    Bus,
    BusError,
    CannotConnect,
    ChannelRejected,
    ConnectionLost,
    Event,
    Gap,
    HandshakeError,
    Identity,
    InvalidName,
    KeyFileError,
    NameEvent,
    NameInfo,
    NameNotFound,
    RequestError,
    ServiceInfo,
    RequestTimeout,
    identity_from_env,
    load_identity,
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
EXIT_SIGINT = 128 + signal.SIGINT  # 130: what a shell reports for a process the signal ended
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

#: The verbs that print data, and so honour --json ('call' prints JSON anyway).  'open' passes
#: a channel's bytes through and refuses --json.
JSON_VERBS = (
    "list",
    "status",
    "monitor",
    "wait",
    "call",
    "introspect",
    "subscribe",
    "emit",
    "start",
    "stop",
    "restart",
    "reload",
    "stats",
    "id",
    "keygen",
)

_OPTIONS_HELP = textwrap.fill(
    "global options (--address, --identity, --network-key, --timeout, --json) go before or after "
    f"the verb. --json is honoured by {', '.join(JSON_VERBS)}; 'open' refuses it.",
    width=79,
)

EXIT_CODES_HELP = f"""{_OPTIONS_HELP}

exit codes:
  {EXIT_OK}    success
  {EXIT_ERROR}    other error (a bad key file, a connection that ended)
  {EXIT_USAGE}    usage error (bad arguments, name or pattern; a malformed address or network key)
  {EXIT_CONNECT}    cannot connect to the bus (no address, nothing listening, identity refused,
       connection refused by a quota, no answer in time)
  {EXIT_DENIED}    denied by the bus's policy
  {EXIT_NOT_FOUND}    not found (no such name or connection; 'wait' timed out)
  {EXIT_REMOTE}    any other error reported by the bus
  {EXIT_SIGINT}  interrupted (SIGINT, Ctrl-C); 'monitor' exits 0
  {EXIT_SIGTERM}  terminated (SIGTERM); 'monitor' exits 0

environment:
  MINIBUS_ADDRESS      the bus address when --address is not given (else the address file)
  MINIBUS_NETWORK_KEY  the network key (hex) when --network-key is not given
  MINIBUS_IDENTITY     the key file to connect as when --identity is not given
                       (busd sets it for a plugin whose service file names one)
"""

ADDRESS_HINT = "an address looks like unix:path=PATH,key=@….ed25519;tcp:host=HOST,port=PORT,key=@….ed25519 (busd prints it)"
_UNIQUE_ID = re.compile(r":[0-9]{1,20}\Z")
_MEMBER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}\Z")


class Failure(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"busctl: {message} (see '{self.prog} --help')\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _add_global_options(p: argparse.ArgumentParser, *, after_verb: bool) -> None:
    """The options of every verb.  After the verb they default to "not given", so what came
    before the verb (or the default) stands unless the option is repeated there."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if after_verb else value

    group = p.add_argument_group("global options (before or after the verb)") if after_verb else p
    group.add_argument(
        "--address", metavar="A", default=default(None), help="bus address (default: MINIBUS_ADDRESS, else the address file)"
    )
    group.add_argument(
        "--identity", metavar="FILE", default=default(None), help="key file to connect as (default: your key, created on first use)"
    )
    group.add_argument(
        "--network-key",
        metavar="HEX",
        default=default(None),
        help="network key, 64 hex digits (default: MINIBUS_NETWORK_KEY or minibus's own)",
    )
    group.add_argument(
        "--timeout",
        metavar="S",
        type=_seconds,
        default=default(10.0),
        help="deadline in seconds for connecting, each request, and 'wait' (default 10)",
    )
    group.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON (one object per line for 'monitor')"
    )


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="busctl",
        description="Inspect and use a minibus: list plugins, watch them come and go, wait for one.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"busctl (minibus) {__version__}")
    _add_global_options(p, after_verb=False)
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        v = verbs.add_parser(name, help=help, description=help)
        _add_global_options(v, after_verb=True)
        return v

    v = verb("list", "list the named plugins on the bus (or, with --activatable, the installed ones)")
    v.add_argument("--all", action="store_true", help="also nameless connections (admin identities only)")
    v.add_argument(
        "--activatable",
        action="store_true",
        help="the installed plugins (service files), running or not: state, pid, restarts, description, version",
    )
    v = verb("status", "show one connection, by well-known name or unique id (:42); for an installed plugin also its pid, restarts, last exit")
    v.add_argument("target", metavar="NAME|ID")
    v = verb("monitor", "print named plugins as they connect and disconnect, until interrupted")
    v.add_argument("patterns", metavar="PATTERN", nargs="*", default=[], help="name patterns such as 'org.example.*' (default: all)")
    v.add_argument("--events", action="store_true", help="also print the events whose source matches the patterns")
    v = verb("wait", "wait until NAME is on the bus (up to --timeout), print its owner")
    v.add_argument("name", metavar="NAME")
    v = verb("call", "call METHOD of the service owning NAME; arguments and result are JSON")
    v.add_argument("name", metavar="NAME")
    v.add_argument("method", metavar="METHOD")
    v.add_argument("args", metavar="ARG", nargs="*", default=[], help="one JSON value per argument, e.g. 3 '\"text\"' '[1,2]'")
    v = verb("introspect", "show the methods (parameters, return type, doc text) and protocols of a service")
    v.add_argument("name", metavar="NAME")
    v = verb("emit", "emit event MEMBER as NAME (owned for the moment if nobody owns it); arguments are JSON")
    v.add_argument("name", metavar="NAME", help="the source: a well-known name (or ':self' for this connection's unique id)")
    v.add_argument("member", metavar="MEMBER", help="the event, an identifier such as NewOtx")
    v.add_argument("args", metavar="ARG", nargs="*", default=[], help="the payload: one JSON value, or a list of several")
    v = verb("subscribe", "print events as they come, one line each, until interrupted (or --count N)")
    v.add_argument("source", metavar="SOURCE", nargs="?", default="*", help="source pattern (default: *)")
    v.add_argument("member", metavar="MEMBER", nargs="?", default="*", help="member pattern (default: *)")
    v.add_argument("--count", type=int, metavar="N", default=None, help="exit after N events")
    v = verb("open", "pipe stdin and stdout through a channel, like netcat (EOF on stdin half-closes)")
    v.add_argument("name", metavar="NAME")
    v.add_argument("--protocol", default="raw", metavar="LABEL", help="the channel's protocol label (default: raw)")
    v.add_argument(
        "--route",
        default="auto",
        choices=["auto", "relay", "direct"],
        help="how the bytes travel: direct (a socket passed by the broker; both ends on its Unix socket), "
        "relay (through the broker), auto (direct when possible, else relay; the default)",
    )
    for name, what in (
        ("start", "start an installed plugin and wait until it owns NAME (admin identities only)"),
        ("stop", "stop an installed plugin: SIGTERM, then SIGKILL after its stop_timeout (admin identities only)"),
        ("restart", "stop, then start an installed plugin, waiting until it owns NAME (admin identities only)"),
    ):
        v = verb(name, what)
        v.add_argument("name", metavar="NAME")
    verb("reload", "make busd read its service files again, as SIGHUP does; prints the problems found (admin identities only)")
    verb(
        "stats",
        "show the broker's figures (connections, handshakes, names, channels, traffic, queues, refusals, plugins) "
        "and per-connection traffic and queues: every connection's for an admin identity, your own otherwise",
    )
    verb("id", "print the identity busctl connects as")
    v = verb("keygen", "create a new identity key file (mode 0600)")
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


# -- arguments, checked before connecting ------------------------------------------------------


def _check_name(name: str) -> None:
    try:
        validate_name(name)
    except InvalidName as exc:
        raise Failure(f"bad name: {_safe(exc.message)}", EXIT_USAGE) from None


def _json_args(texts: list[str]) -> list[Any]:
    values = []
    for text in texts:
        try:
            values.append(json.loads(text))
        except ValueError as exc:
            raise Failure(f"argument {_safe(text)!r} is not JSON ({exc}); quote strings, e.g. '\"text\"'", EXIT_USAGE) from None
    return values


def _check_args(args: argparse.Namespace) -> None:
    """Refuse what the bus would refuse (or, for a pattern, never match) before connecting."""
    if args.verb == "status":
        if args.target.startswith(":"):
            if not _UNIQUE_ID.match(args.target):
                raise Failure(f"bad unique id {_safe(args.target)!r}: a unique id is ':' and digits, like :42", EXIT_USAGE)
        else:
            _check_name(args.target)
    elif args.verb in ("wait", "call", "introspect", "open", "start", "stop", "restart"):
        _check_name(args.name)
    if args.verb == "list" and args.all and args.activatable:
        raise Failure("--all lists connections and --activatable installed plugins: give one of them", EXIT_USAGE)
    if args.verb == "monitor":
        for pattern in args.patterns:
            try:
                compile_glob(pattern)
            except GlobError as exc:
                raise Failure(f"bad pattern {_safe(pattern)!r}: {exc}", EXIT_USAGE) from None
    elif args.verb == "call":
        args.values = _json_args(args.args)
    elif args.verb == "emit":
        if args.name != ":self":
            _check_name(args.name)
        if not _MEMBER.match(args.member):
            raise Failure(f"bad member {_safe(args.member)!r}: an identifier (letters, digits, '_'), like NewOtx", EXIT_USAGE)
        values = _json_args(args.args)
        args.payload = values[0] if len(values) == 1 else (values or None)
    elif args.verb == "subscribe":
        for pattern in (args.source, args.member):
            try:
                compile_glob(pattern)
            except GlobError as exc:
                raise Failure(f"bad pattern {_safe(pattern)!r}: {exc}", EXIT_USAGE) from None
        if args.count is not None and args.count < 1:
            raise Failure("--count wants a number of events, 1 or more", EXIT_USAGE)
    elif args.verb == "open":
        if args.json:
            raise Failure("open passes the channel's bytes through and prints no JSON: drop --json", EXIT_USAGE)
        if not CHANNEL_PROTOCOL_RE.match(args.protocol):
            raise Failure(
                f"bad protocol label {_safe(args.protocol)!r}: 1 to 64 letters, digits and '._+-', "
                "starting with a letter or digit",
                EXIT_USAGE,
            )


# -- connecting ------------------------------------------------------------------------------


def _identity(args: argparse.Namespace) -> Identity:
    try:
        return load_identity(args.identity) if args.identity else identity_from_env()
    except KeyFileError as exc:
        raise Failure(str(exc), EXIT_ERROR) from exc
    except OSError as exc:
        raise Failure(f"{exc.filename or args.identity or 'key file'}: {exc.strerror or exc}", EXIT_ERROR) from exc


def _network_key(args: argparse.Namespace) -> bytes | None:
    source, text = "--network-key", args.network_key
    if not text:
        source, text = "MINIBUS_NETWORK_KEY", os.environ.get("MINIBUS_NETWORK_KEY")
    try:
        return parse_network_key(text) if text else None
    except ValueError as exc:
        raise Failure(f"{source}: {exc}", EXIT_USAGE) from exc


def _address_source(args: argparse.Namespace) -> str:
    if args.address:
        return "--address"
    return "MINIBUS_ADDRESS" if os.environ.get("MINIBUS_ADDRESS") else "the address file"


@asynccontextmanager
async def _connect(args: argparse.Namespace) -> AsyncIterator[Bus]:
    identity = _identity(args)
    network_key = _network_key(args)
    async with AsyncExitStack() as stack:
        try:
            bus = await stack.enter_async_context(
                open_bus(
                    args.address,
                    identity=identity,
                    network_key=network_key,
                    reconnect=False,
                    request_timeout=args.timeout,
                    connect_timeout=args.timeout,
                )
            )
        except ValueError as exc:  # a malformed address, or a broker key that is no Ed25519 point
            raise Failure(f"bad bus address ({_address_source(args)}): {_safe(str(exc))}; {ADDRESS_HINT}", EXIT_USAGE) from exc
        except (CannotConnect, HandshakeError, OSError) as exc:
            raise Failure(str(exc), EXIT_CONNECT) from exc
        yield bus


# -- verbs -----------------------------------------------------------------------------------


async def verb_list(args: argparse.Namespace) -> None:
    if args.activatable:
        await _list_activatable(args)
        return
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


def _state_text(svc: ServiceInfo) -> str:
    if svc.state == "failed" and svc.failure:
        return f"failed ({svc.failure})"
    return svc.state


async def _list_activatable(args: argparse.Namespace) -> None:
    async with _connect(args) as bus:
        services = await bus.list_services()
    if args.json:
        _json([svc.to_json() for svc in services])
        return
    rows = [
        [
            svc.name,
            svc.state,
            str(svc.pid) if svc.pid is not None else "-",
            str(svc.restarts),
            svc.activation,
            _safe(svc.version) or "-",
            _safe(svc.description) or "-",
        ]
        for svc in services
    ]
    _table(rows, ["NAME", "STATE", "PID", "RESTARTS", "ACTIVATION", "VERSION", "DESCRIPTION"])


def _service_lines(svc: ServiceInfo) -> list[tuple[str, str]]:
    lines = [
        ("installed", f"activation {svc.activation}, restart {svc.restart}" + (f", {svc.details['file']}" if "file" in svc.details else "")),
        ("plugin state", _state_text(svc)),
        ("plugin pid", str(svc.pid) if svc.pid is not None else "-"),
        ("restarts", str(svc.restarts)),
        ("last exit", svc.last_exit or "-"),
    ]
    if "exec" in svc.details:
        lines.append(("command", " ".join(map(str, svc.details["exec"]))))
    return lines


async def verb_status(args: argparse.Namespace) -> None:
    async with _connect(args) as bus:
        service: ServiceInfo | None = None
        if not args.target.startswith(":"):
            try:
                service = await bus.service_status(args.target)
            except NameNotFound:
                pass
        try:
            entry = await bus.info(args.target)
        except NameNotFound:
            if service is None:
                raise
            # Installed, but nobody owns the name now: what busd knows of the plugin.
            if args.json:
                _json({"name": args.target, "service": service.to_json()})
            else:
                _out(f"{'name:':17}{_safe(args.target)} (not on the bus now)")
                _out(f"{'description:':17}{_safe(service.description) or '-'}")
                _out(f"{'version:':17}{_safe(service.version) or '-'}")
                for key, value in _service_lines(service):
                    _out(f"{key + ':':17}{_safe(value)}")
            return
    if args.json:
        data = entry.to_json()
        if service is not None:
            data["service"] = service.to_json()
        _json(data)
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
    if service is not None:
        fields += _service_lines(service)
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


def _bus_event_line(item: Event | Gap) -> str:
    if isinstance(item, Gap):
        return _safe(f"gap           {item.missed if item.missed is not None else 'an unknown number of'} events missed ({item.reason})")
    payload = json.dumps(_jsonable(item.payload), sort_keys=True, default=str)
    return _safe(f"event         {item.source} {item.member} {payload} (from {item.sender})")


async def verb_monitor(args: argparse.Namespace) -> None:
    patterns = args.patterns or ["*"]
    async with _connect(args) as bus, bus.watch(patterns) as watch, trio.open_nursery() as nursery:
        if args.events:
            for pattern in patterns:
                nursery.start_soon(_print_events, bus, pattern, "*", None, args.json)
        async for ev in watch:
            if args.json:
                _json(ev.to_json())
            else:
                _out(_event_line(ev))


async def _print_events(bus: Bus, source: str, member: str, count: int | None, as_json: bool) -> None:
    printed = 0
    async with bus.subscribe(source, member) as events:
        async for item in events:
            if as_json:
                _json(item.to_json())
            else:
                _out(_bus_event_line(item))
            if isinstance(item, Event):
                printed += 1
                if count is not None and printed >= count:
                    return


async def verb_subscribe(args: argparse.Namespace) -> None:
    async with _connect(args) as bus:
        await _print_events(bus, args.source, args.member, args.count, args.json)


async def verb_emit(args: argparse.Namespace) -> None:
    async with _connect(args) as bus:
        source = None if args.name == ":self" else args.name
        if source is not None:
            result = await bus.request_name(source, ["do-not-queue"])
            if result not in ("primary-owner", "already-owner"):
                owner = await bus.resolve(source)
                raise Failure(f"{source} is owned by {owner.unique_id} ({owner.identity}): only its owner may emit as it", EXIT_DENIED)
        delivered = await bus.emit(args.member, args.payload, source=source)
    if args.json:
        _json({"delivered": delivered})
    else:
        _out(f"delivered to {delivered} connection{'s' if delivered != 1 else ''}")


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


async def verb_call(args: argparse.Namespace) -> None:
    async with _connect(args) as bus:
        result = await bus.call(args.name, args.method, *args.values)
    _json(result)


def _method_line(method: dict[str, Any]) -> str:
    params = ", ".join(
        str(p.get("name")) + (f": {p['type']}" if "type" in p else "") + (f" = {p['default']}" if "default" in p else "")
        for p in method.get("params", [])
    )
    returns = f" -> {method['returns']}" if "returns" in method else ""
    return f"  {method.get('name')}({params}){returns}"


async def verb_introspect(args: argparse.Namespace) -> None:
    async with _connect(args) as bus:
        described = await bus.introspect(args.name)
    if args.json:
        _json(described)
        return
    _out(_safe(f"{described.get('name')}: {described.get('info', {}).get('description', '')}"))
    _out(_safe(f"protocols: {', '.join(map(str, described.get('protocols', [])))}"))
    for method in described.get("methods", []):
        _out(_safe(_method_line(method)))
        for line in str(method.get("doc", "")).splitlines():
            _out(_safe(f"      {line}"))
    for event in described.get("events", []):
        _out(_safe(f"  event {event.get('member')}"))
        for line in str(event.get("doc", "")).splitlines():
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
                    try:
                        await stdout.send_all(data)
                    except trio.BrokenResourceError:  # whoever read our output is gone (| head)
                        nursery.cancel_scope.cancel()
                        break


async def verb_service(args: argparse.Namespace) -> None:
    """start, stop, restart NAME (an installed plugin)."""
    async with _connect(args) as bus:
        command = {"start": bus.start_service, "stop": bus.stop_service, "restart": bus.restart_service}[args.verb]
        result = await command(args.name)
    if args.json:
        _json(result)
        return
    if args.verb == "stop":
        _out(_safe(f"stopped {args.name} (was {result.get('was', '?')})"))
    else:
        _out(_safe(f"{args.verb}ed {args.name} (pid {result.get('pid')})"))


async def verb_reload(args: argparse.Namespace) -> None:
    async with _connect(args) as bus:
        result = await bus.reload_services()
    if args.json:
        _json(result)
        return
    count = result.get("services", 0)
    _out(f"{count} installed plugin{'s' if count != 1 else ''}")
    for line in result.get("errors", []):
        _out(_safe(f"error: {line}"))


def _counts(values: dict[str, Any]) -> str:
    """``a 1, b 2`` (sorted by label), or ``none``."""
    shown = [f"{label} {value}" for label, value in sorted(values.items())]
    return ", ".join(shown) or "none"


async def verb_stats(args: argparse.Namespace) -> None:
    async with _connect(args) as bus:
        stats = await bus.stats()
    if args.json:
        _json(stats)
        return
    t: dict[str, Any] = stats["totals"]
    connections, admitted = t["connections"], t["connections_admitted"]
    in_progress = sum(t["handshakes_in_progress"].values())
    plugins = t["plugins"]
    fields = [
        ("since", _since(t["started"])),
        ("connections", f"{sum(connections.values())} now ({_counts(connections)}); {sum(admitted.values())} admitted since start"),
        ("handshakes", f"{t['handshakes']} completed, {in_progress} in progress; failed: {_counts(t['handshake_failures'])}"),
        ("names", str(t["names"])),
        ("watches", str(t["watches"])),
        ("subscriptions", str(t["subscriptions"])),
        ("channels", f"{sum(t['channels'].values())} ({_counts(t['channels'])}), {t['channels_pending']} opening"),
        ("traffic in", f"{t['bytes_in']} bytes in {t['messages_in']} messages"),
        ("traffic out", f"{t['bytes_out']} bytes in {t['messages_out']} messages"),
        ("queued", f"{t['queued_bytes']} bytes in {t['queued_messages']} messages (fullest queue {t['queued_bytes_max']} bytes)"),
        ("slow consumers", f"{t['slow_consumer_disconnects']} disconnected"),
        ("limit refusals", _counts(t["refusals"])),
        (
            "plugins",
            "; ".join(
                f"{name}: {c['launches']} launches, {c['restarts']} restarts, {c['failures']} failures"
                for name, c in sorted(plugins.items())
            )
            or "none",
        ),
    ]
    for key, value in fields:
        _out(_safe(f"{key + ':':17}{value}"))
    _out()
    rows = [
        [
            c["unique_id"],
            c["name"] or "-",
            c["transport"],
            str(c["bytes_in"]),
            str(c["bytes_out"]),
            str(c["messages_in"]),
            str(c["messages_out"]),
            str(c["queued_bytes"]),
            str(c["channels"]),
            str(c["watches"]),
            str(c["subscriptions"]),
            c["identity"],
        ]
        for c in stats["connections"]
    ]
    headers = ["UNIQUE-ID", "NAME", "TRANSPORT", "BYTES-IN", "BYTES-OUT", "MSGS-IN", "MSGS-OUT", "QUEUED", "CHANNELS", "WATCHES", "SUBS", "IDENTITY"]
    _table([[_safe(cell) for cell in row] for row in rows], headers)


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
    except (OSError, ValueError) as exc:
        raise Failure(f"{args.file}: cannot write the key file: {getattr(exc, 'strerror', None) or exc}", EXIT_ERROR) from exc
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
    "emit": verb_emit,
    "subscribe": verb_subscribe,
    "start": verb_service,
    "stop": verb_service,
    "restart": verb_service,
    "reload": verb_reload,
    "stats": verb_stats,
    "id": verb_id,
    "keygen": verb_keygen,
}


# -- running a verb: signals, errors and exit codes ----------------------------------------------


async def _run(args: argparse.Namespace, handled: list[int], early: list[int]) -> int | None:
    """Run the verb until it ends or one of the ``handled`` signals cancels it; returns that
    signal, if one came (one that came before the receiver was in place is in ``early``)."""
    if not handled:
        await VERBS[args.verb](args)
        return None
    caught: list[int] = []
    with trio.open_signal_receiver(*handled) as signals:
        try:
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for signum in signals:
                        caught.append(signum)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_signal)
                if early:
                    caught.append(early[0])
                    nursery.cancel_scope.cancel()
                await VERBS[args.verb](args)
                nursery.cancel_scope.cancel()
        except Exception:
            if caught:
                return caught[0]  # asked to stop: what stopping broke does not matter
            raise
    return caught[0] if caught else None


def _cause(exc: BaseException) -> BaseException:
    """The exception to report: from a group, the first busctl or bus error, else the first."""
    if isinstance(exc, BaseExceptionGroup):
        known = exc.subgroup(lambda e: isinstance(e, (Failure, BusError)))
        exc = known if known is not None else exc
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
    return exc


def _exit_code(exc: BaseException, verb: str) -> tuple[int, str]:
    if isinstance(exc, Failure):
        return exc.code, str(exc)
    if isinstance(exc, AccessDenied):
        return EXIT_DENIED, exc.message
    if isinstance(exc, NameNotFound):
        return EXIT_NOT_FOUND, exc.message
    if isinstance(exc, InvalidName) or (isinstance(exc, BadRequest) and verb not in ("call", "introspect")):
        return EXIT_USAGE, str(exc)  # the broker found fault with what we passed on from the command line
    if isinstance(exc, ChannelRejected):
        return EXIT_REMOTE, exc.message
    if isinstance(exc, RequestError):
        return EXIT_REMOTE, str(exc)
    if isinstance(exc, RequestTimeout):
        return EXIT_CONNECT, str(exc)
    if isinstance(exc, (ConnectionLost, BusError)):
        return EXIT_ERROR, str(exc)
    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
        return EXIT_ERROR, f"the connection broke: {exc}"
    if isinstance(exc, OSError):
        return EXIT_ERROR, f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}"
    return EXIT_ERROR, f"internal error (please report it): {type(exc).__name__}: {exc}"


def _quiet_stdout() -> None:
    """Whoever read our output left (``busctl monitor | head -1``): drop what remains, so
    the interpreter's last flush does not complain on stderr."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    # busctl reports failures itself, on one line: the library's log lines stay out of it.
    logging.getLogger("minibus").addHandler(logging.NullHandler())
    early: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        early.append(signum)

    # A signal ignored when we started (SIGINT for a job a script put in the background)
    # stays ignored, as shells do; off the main thread, signals are the program's business.
    handled: list[int] = []
    if threading.current_thread() is threading.main_thread():
        handled = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN]
    if signal.SIGTERM in handled:
        signal.signal(signal.SIGTERM, remember)
    args = _parser().parse_args(argv)
    signum: int | None = None
    try:
        _check_args(args)
        signum = trio.run(_run, args, handled, early)
    except KeyboardInterrupt:
        signum = signal.SIGINT
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_OK
    except Exception as exc:  # incl. groups; anything unexpected still ends as one line
        cause = _cause(exc)
        if isinstance(cause, BrokenPipeError):
            _quiet_stdout()
            return EXIT_OK
        code, message = _exit_code(cause, args.verb)
        print(f"busctl: {' '.join(message.splitlines())}", file=sys.stderr)
        return code
    signum = signum or (early[0] if early else None)
    if signum is None:
        return EXIT_OK
    if args.verb == "monitor":
        return EXIT_OK
    return EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM


if __name__ == "__main__":
    sys.exit(main())
