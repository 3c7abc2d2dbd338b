"""``busd``: run the minibus broker.

With no arguments it runs on embedded defaults: the user's default identity as the broker
key (created on first run), the Unix socket ``$XDG_RUNTIME_DIR/minibus/bus.sock`` (else
``/tmp/minibus-$UID/bus.sock``), TCP ``127.0.0.1:7420``, and an address file beside the
socket.  Once it listens it prints ``MINIBUS_ADDRESS=<address>`` on stdout.  SIGINT and
SIGTERM shut it down gracefully: clients are told, sockets and the address file removed.
Started by systemd, it serves the sockets systemd passes and notifies it (``bus.io.systemd``).
"""

from __future__ import annotations

import argparse
import gc
import dataclasses
import difflib
import errno
import json
import logging
import math
import os
import resource
import signal
import socket
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import trio

from . import __version__
from .broker import Broker, BrokerAlreadyRunning, BrokerConfig, check_settings, default_runtime_dir
from .core.broker import Limits
from .core.policy import Policy, PolicyError, parse_authorized_keys
from .errors import SocketActivationError, KeyFileError
from .io.systemd import SystemdNotifier, adopt_listen_fds, use_journal_priorities
from .metrics import CannotServeMetrics, MetricsServer
from .supervisor import default_service_dir
from .wire.files import LocalFileError, check_private_dir, read_trusted_file
from .wire.identity import default_identity_path, load_identity, load_or_create_identity
from .wire.shs import parse_network_key
from .wire.systemd import status_line

log = logging.getLogger("minibus.busd")

EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_RUNNING = 4

#: The config file's top-level keys, and its [broker] keys with what each expects.  The
#: [limits] keys are the int and float fields of ``Limits`` and ``BrokerConfig`` (below).
_TOP_KEYS = ("broker", "limits", "rule", "authorized_keys")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_BROKER_KEYS = {
    "unix": "a path (string)",
    "runtime_dir": "a path (string)",
    "key": "a path (string)",
    "authorized_keys": "a path (string)",
    "network_key": "a string of 64 hex digits",
    "tcp": 'a string "HOST:PORT", or false',
    "encrypt_unix": "true or false",
    "log_level": " or ".join(f'"{level}"' for level in _LOG_LEVELS),
    "services": "a list of paths (directories of service files)",
    "metrics": 'a string "HOST:PORT"',
}


def _numeric_fields(cls: Any) -> dict[str, type]:
    """The int and float fields of a dataclass (bool ones excluded), by name."""
    kinds: dict[object, type] = {"int": int, "float": float, int: int, float: float}
    found = {}
    for f in dataclasses.fields(cls):
        kind = kinds.get(f.type)
        if kind is not None:
            found[f.name] = kind
    return found


#: [limits] keys that go to ``Limits`` (sizes and counts), and to ``BrokerConfig`` (frame
#: sizes, queue sizes and timeouts), with their types: every int or float field of each.
_LIMIT_KEYS = _numeric_fields(Limits)
_TIMING_KEYS = {k: v for k, v in _numeric_fields(BrokerConfig).items() if k not in _LIMIT_KEYS}


class ConfigError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"busd: {message} (see 'busd --help')\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="busd",
        description="Run the minibus broker. With no arguments it uses its embedded defaults.",
        epilog="Environment: MINIBUS_NETWORK_KEY (hex) sets the network key when --network-key is not given. "
        "Signals: SIGINT and SIGTERM stop busd (and its plugins); SIGHUP reads the service files again. "
        "Under systemd: LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES (socket activation), NOTIFY_SOCKET, WATCHDOG_USEC "
        "(sd_notify; see docs/operations.md). "
        "Exit codes: 0 after a clean shutdown (SIGINT, SIGTERM), 2 usage, 3 a configuration problem "
        "or cannot listen, 4 another broker already listens on the socket.",
    )
    p.add_argument("--version", action="version", version=f"busd (minibus) {__version__}")
    p.add_argument("--unix", metavar="PATH", help="Unix socket path (default: RUNTIME_DIR/bus.sock)")
    tcp = p.add_mutually_exclusive_group()
    tcp.add_argument("--tcp", metavar="HOST:PORT", help="TCP address to listen on (default 127.0.0.1:7420; port 0 picks one)")
    tcp.add_argument("--no-tcp", action="store_true", help="do not listen on TCP")
    p.add_argument("--key", metavar="FILE", help="the broker's identity (default: the user's key, created on first run)")
    p.add_argument("--network-key", metavar="HEX", help="shs network key, 64 hex digits (default: minibus's own)")
    p.add_argument("--config", metavar="FILE", help="TOML configuration: [broker], [limits] and [[rule]] tables")
    p.add_argument("--runtime-dir", metavar="DIR", help="where the socket and address file live (default: $XDG_RUNTIME_DIR/minibus)")
    p.add_argument("--authorized-keys", metavar="FILE", help="keys with every right (default: $XDG_CONFIG_HOME/minibus/authorized_keys)")
    p.add_argument(
        "--services",
        metavar="DIR",
        action="append",
        default=[],
        help="a directory of service files (installed plugins; repeatable); also [broker] services and "
        "$XDG_DATA_HOME/minibus/services (see docs/activation.md)",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; port 0 picks one)",
    )
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"], help="default: info")
    return p


def _parse_hostport(text: str, what: str = "--tcp") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise ConfigError(f"{what} wants HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _show(value: object) -> str:
    """A config value as TOML would write it, short and on one line."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, str):
        text = json.dumps(value)
    else:
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _unknown(key: str, known: Iterable[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(sorted(known))
    return ConfigError(f"{where}: unknown key {key!r} ({hint})")


def _read_config(path: str) -> dict[str, Any]:
    """The config file, parsed, once it passes the trusted-file checks."""
    try:
        raw = read_trusted_file(path, "config file")
        return tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except LocalFileError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _is_path(value: object) -> bool:
    return isinstance(value, str) and value != "" and "\0" not in value


def _check_config(data: dict[str, Any], source: str) -> None:
    """Refuse unknown keys and wrongly typed values: a typo must never be ignored silently."""
    for key in data:
        if key not in _TOP_KEYS:
            raise _unknown(key, _TOP_KEYS, f"{source}: top level")
    for table in ("broker", "limits"):
        if not isinstance(data.get(table, {}), dict):
            raise ConfigError(f"{source}: [{table}] must be a table")
    top_keys = data.get("authorized_keys")
    if top_keys is not None and not _is_path(top_keys):
        raise ConfigError(f"{source}: authorized_keys = {_show(top_keys)}: expected a path (string)")
    for key, value in data.get("broker", {}).items():
        if key not in _BROKER_KEYS:
            raise _unknown(key, _BROKER_KEYS, f"{source}: [broker]")
        if key == "tcp":
            ok = value is False or (isinstance(value, str) and bool(value))
        elif key == "encrypt_unix":
            ok = isinstance(value, bool)
        elif key == "log_level":
            ok = isinstance(value, str) and value in _LOG_LEVELS
        elif key == "services":
            ok = isinstance(value, list) and all(_is_path(v) for v in value)
        elif key == "metrics":
            ok = isinstance(value, str) and bool(value)
        else:
            ok = _is_path(value) if key != "network_key" else isinstance(value, str)
        if not ok:
            raise ConfigError(f"{source}: [broker] {key} = {_show(value)}: expected {_BROKER_KEYS[key]}")
    for key, value in data.get("limits", {}).items():
        kind = _LIMIT_KEYS.get(key) or _TIMING_KEYS.get(key)
        if kind is None:
            raise _unknown(key, [*_LIMIT_KEYS, *_TIMING_KEYS], f"{source}: [limits]")
        numeric = isinstance(value, int) or (kind is float and isinstance(value, float) and math.isfinite(value))
        if isinstance(value, bool) or not numeric or value <= 0:
            expected = "an integer" if kind is int else "a number (seconds)"
            raise ConfigError(f"{source}: [limits] {key} = {_show(value)}: expected {expected} greater than 0")


def _read_authorized_keys(path: Path, explicit: bool) -> frozenset[str]:
    """Keys with every right; the default file may be absent, a configured one may not."""
    try:
        raw = read_trusted_file(path, "authorized_keys file")
        return parse_authorized_keys(raw.decode("utf-8"), str(path))
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such authorized_keys file") from None
        return frozenset()
    except (LocalFileError, PolicyError) as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the authorized_keys file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the authorized_keys file is not UTF-8 text") from None


def _check_runtime_dir(directory: Path) -> None:
    """Refuse a socket directory that is not ours alone; a missing one busd creates 0700."""
    try:
        check_private_dir(directory)
    except FileNotFoundError:
        pass
    except LocalFileError as exc:
        raise ConfigError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{directory}: cannot check the runtime directory: {exc}") from None


def build_config(args: argparse.Namespace) -> tuple[BrokerConfig, str]:
    data: dict[str, Any] = {}
    if args.config:
        data = _read_config(args.config)
        _check_config(data, args.config)
    section: dict[str, Any] = data.get("broker", {})
    limits_section: dict[str, Any] = data.get("limits", {})
    runtime_dir = Path(args.runtime_dir or section.get("runtime_dir") or default_runtime_dir())
    unix_path = Path(args.unix or section.get("unix") or runtime_dir / "bus.sock")
    # The directory busd writes its socket and address file in (``BrokerConfig.address_file``).
    _check_runtime_dir(unix_path.parent)
    tcp: tuple[str, int] | None = ("127.0.0.1", 7420)
    if isinstance(section.get("tcp"), str):  # checked even when the command line overrides it
        tcp = _parse_hostport(section["tcp"], f"{args.config}: [broker] tcp")
    if args.no_tcp or section.get("tcp") is False:
        tcp = None
    if args.tcp:
        tcp = _parse_hostport(args.tcp)
    key_path = args.key or section.get("key")
    try:
        identity = load_identity(key_path) if key_path else load_or_create_identity(default_identity_path())
    except KeyFileError as exc:
        raise ConfigError(str(exc)) from exc
    net_text = args.network_key or section.get("network_key") or os.environ.get("MINIBUS_NETWORK_KEY")
    try:
        network_key = parse_network_key(net_text) if net_text else None
    except ValueError as exc:
        raise ConfigError(f"network key: {exc}") from exc
    ak_given = args.authorized_keys or section.get("authorized_keys") or data.get("authorized_keys")
    ak_path = Path(ak_given) if ak_given else default_identity_path().parent / "authorized_keys"
    authorized = _read_authorized_keys(ak_path, explicit=bool(ak_given))
    try:
        policy = Policy.from_mapping(identity.public_key, data, authorized)
    except PolicyError as exc:
        raise ConfigError(f"{args.config}: {exc}" if args.config else str(exc)) from exc
    try:
        limits = Limits(**{k: v for k, v in limits_section.items() if k in _LIMIT_KEYS})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{args.config}: [limits]: {exc}") from exc
    # Made absolute now: a plugin's relative paths are resolved against its file's directory,
    # and it is started from there, so a relative directory would be counted twice.
    service_dirs = [(Path(d).absolute(), True) for d in [*args.services, *section.get("services", [])]]
    service_dirs.append((default_service_dir(), False))
    config = BrokerConfig(
        service_dirs=service_dirs,
        identity=identity,
        policy=policy,
        unix_path=unix_path,
        tcp=tcp,
        runtime_dir=runtime_dir,
        limits=limits,
        encrypt_unix=section.get("encrypt_unix", False),
    )
    if network_key is not None:
        config.network_key = network_key
    if isinstance(section.get("metrics"), str):  # checked even when the command line overrides it
        config.metrics = _parse_hostport(section["metrics"], f"{args.config}: [broker] metrics")
    if args.metrics:
        config.metrics = _parse_hostport(args.metrics, "--metrics")
    for key, kind in _TIMING_KEYS.items():
        if key in limits_section:
            setattr(config, key, kind(limits_section[key]))
    try:
        check_settings(config)
    except ValueError as exc:
        raise ConfigError(f"{args.config or 'busd'}: [limits]: {exc}") from exc
    level: str = args.log_level or section.get("log_level") or "info"
    return config, level


#: How often busd moves what has survived so far out of the cyclic garbage collector's sight.
GC_FREEZE_INTERVAL = 1.0
#: How often it lets the collector look at everything once more (a safety net: the broker's
#: own structures leave no cycles behind, tested in tests/test_isolation_core.py).
GC_FULL_INTERVAL = 3600.0


async def pace_garbage_collection() -> None:
    """Keep the cyclic garbage collector's pauses short however many connections are held.

    A full collection walks every tracked object: with 10,000 connections that is a pause of
    about 400 ms (measured here), and a crowd of connections ending at once is what tends to
    trigger one.  Objects that have lived a second are frozen (``gc.freeze``), so collections
    only ever walk what is new; they are still freed by reference counting when they go, which
    is how connections end (no cycles: see ``Broker._handle``).  Once an hour everything is
    unfrozen and collected, for cycles a library might have left."""
    last_full = trio.current_time()
    while True:
        await trio.sleep(GC_FREEZE_INTERVAL)
        if trio.current_time() - last_full >= GC_FULL_INTERVAL:
            gc.unfreeze()
            gc.collect()
            last_full = trio.current_time()
        # Young garbage first (cheap: only what is new), so no cycle is frozen alive.
        gc.collect(1)
        gc.freeze()


async def _start_metrics(broker: Broker, nursery: trio.Nursery) -> str | None:
    """Serve /metrics when configured; its URL (with the port bound), else None."""
    config = broker.config
    if config.metrics is None:
        return None
    server = MetricsServer(
        broker,
        timeout=config.metrics_timeout,
        max_scrapers=config.metrics_scrapers,
        max_request_bytes=config.metrics_request_bytes,
    )
    host, port = await nursery.start(server.serve, *config.metrics)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
    log.info("serving metrics at %s", url)
    return url


async def run(config: BrokerConfig, notifier: SystemdNotifier | None = None) -> None:
    broker = Broker(config)
    notifier = notifier or SystemdNotifier.from_environ()  # NOTIFY_SOCKET, WATCHDOG_* (systemd)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pace_garbage_collection)
        serve_scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
            with serve_scope:
                await broker.serve(task_status=task_status)

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            metrics_url = await _start_metrics(broker, nursery)  # first: a bad address stops busd before the bus is up
            address = await nursery.start(serve)
            print(f"MINIBUS_ADDRESS={address}", flush=True)
            if metrics_url is not None:
                print(f"MINIBUS_METRICS={metrics_url}", flush=True)
            await notifier.notify(ready=True, status=status_line(broker.endpoints, len(broker.sessions)))
            nursery.start_soon(notifier.keep_informed, lambda: status_line(broker.endpoints, len(broker.sessions)))
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("received SIGHUP: reading the service files again")
                    broker.reload_services()
                    continue
                log.info("received %s: shutting down", signal.Signals(signum).name)
                break
            # Still inside the signal receiver: a second SIGTERM (or a SIGHUP) while plugins
            # are being stopped is taken and ignored here, not left to its default action,
            # which would end busd at once and leave its plugins running.
            await notifier.stopping()
            # Plugins first (SIGTERM, then SIGKILL after their stop_timeout), while they can
            # still say goodbye; then the clients.
            await broker.supervisor.stop_all()
            broker.begin_shutdown()
            with trio.move_on_after(config.close_timeout + 1):
                while broker.sessions:
                    await trio.sleep(0.01)
        serve_scope.cancel()
        nursery.cancel_scope.cancel()
    notifier.close()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).splitlines())


def _raised_in(error: BaseException, function: str) -> bool:
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function:
            return True
        tb = tb.tb_next
    return False


def _cannot_listen(error: OSError, config: BrokerConfig) -> str:
    """Why busd cannot listen, naming the address, and what to do about it."""
    reason = error.strerror or str(error)
    if config.tcp is not None and (
        isinstance(error, socket.gaierror)
        or error.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL)  # (a Unix socket in use is another busd)
        or _raised_in(error, "open_tcp_listeners")
    ):
        host, port = config.tcp
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if error.errno == errno.EADDRINUSE:
            reason = "the address is already in use (another busd, or another program, has that port)"
            fix = f"pick a free port with --tcp {where.rpartition(':')[0]}:0"
        else:
            fix = "listen on an address of this machine (--tcp 127.0.0.1:0 picks a free port)"
        return f"cannot listen on TCP {where}: {reason}; {fix}, or run without TCP: --no-tcp"
    path = error.filename or config.unix_path
    return f"cannot listen{f' on {path}' if path else ''}: {reason}"


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit (the usual soft 1,024 is what a
    crowd of connections runs into first); returns the (old, new) soft limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config, level = build_config(args)
    except ConfigError as exc:
        print(f"busd: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s.%(msecs)03d busd: %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )
    use_journal_priorities(logging.getLogger())
    try:  # the sockets systemd passed (docs/operations.md#systemd)
        config.inherited = adopt_listen_fds()
    except SocketActivationError as exc:
        print(f"busd: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    for adopted in config.inherited:
        log.info("socket activation: %s", adopted)
    if not os.environ.get("XDG_RUNTIME_DIR") and config.address_file.parent == default_runtime_dir():
        log.warning(
            "XDG_RUNTIME_DIR is not set: falling back to %s (it must be yours, mode 0700); set XDG_RUNTIME_DIR",
            config.address_file.parent,
        )
    old_limit, new_limit = raise_fd_limit()
    if new_limit != old_limit:
        log.info("open-file limit raised from %d to %d", old_limit, new_limit)
        config = dataclasses.replace(config, plugin_nofile=old_limit)  # plugins get the old one
    status = 0
    try:
        trio.run(run, config)
    except* BrokerAlreadyRunning as group:
        print(f"busd: {group.exceptions[0]}", file=sys.stderr)
        status = EXIT_RUNNING
    except* CannotServeMetrics as group:
        print(f"busd: {_one_line(group.exceptions[0])}; pick a free port (--metrics HOST:0 picks one)", file=sys.stderr)
        status = EXIT_CONFIG
    except* LocalFileError as group:  # the runtime directory changed under us since build_config
        print(f"busd: {_one_line(group.exceptions[0])}", file=sys.stderr)
        status = EXIT_CONFIG
    except* OSError as group:
        error = group.exceptions[0]
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        print(f"busd: {_cannot_listen(error, config)}", file=sys.stderr)
        status = EXIT_CONFIG
    return status


if __name__ == "__main__":
    sys.exit(main())
