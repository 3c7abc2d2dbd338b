"""``busd``: run the minibus broker.

With no arguments it runs on embedded defaults: the user's default identity as the broker
key (created on first run), the Unix socket ``$XDG_RUNTIME_DIR/minibus/bus.sock`` (else
``/tmp/minibus-$UID/bus.sock``), TCP ``127.0.0.1:7420``, and an address file beside the
socket.  Once it listens it prints ``MINIBUS_ADDRESS=<address>`` on stdout.  SIGINT and
SIGTERM shut it down gracefully: clients are told, sockets and the address file removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any

import trio

from .broker import Broker, BrokerAlreadyRunning, BrokerConfig, default_runtime_dir
from .core.broker import Limits
from .core.policy import Policy, PolicyError, parse_authorized_keys
from .errors import KeyFileError
from .wire.identity import default_identity_path, load_identity, load_or_create_identity
from .wire.shs import parse_network_key

log = logging.getLogger("minibus.busd")

EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_RUNNING = 4

_LIMIT_KEYS = {
    "connections_per_identity",
    "names_per_connection",
    "watches_per_connection",
    "patterns_per_watch",
    "pattern_length",
    "info_bytes",
    "reply_bytes",
    "channels_per_connection",
    "relay_credit",
}
_TIMING_KEYS = {
    "max_frame": int,
    "max_control": int,
    "handshake_timeout": float,
    "keepalive_interval": float,
    "keepalive_timeout": float,
    "outbound_queue": int,
    "outbound_bytes": int,
    "close_timeout": float,
    "channel_timeout": float,
}


class ConfigError(Exception):
    pass


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="busd",
        description="Run the minibus broker. With no arguments it uses its embedded defaults.",
        epilog="Environment: MINIBUS_NETWORK_KEY (hex) sets the network key when --network-key is not given.",
    )
    p.add_argument("--unix", metavar="PATH", help="Unix socket path (default: RUNTIME_DIR/bus.sock)")
    tcp = p.add_mutually_exclusive_group()
    tcp.add_argument("--tcp", metavar="HOST:PORT", help="TCP address to listen on (default 127.0.0.1:7420; port 0 picks one)")
    tcp.add_argument("--no-tcp", action="store_true", help="do not listen on TCP")
    p.add_argument("--key", metavar="FILE", help="the broker's identity (default: the user's key, created on first run)")
    p.add_argument("--network-key", metavar="HEX", help="shs network key, 64 hex digits (default: minibus's own)")
    p.add_argument("--config", metavar="FILE", help="TOML configuration: [broker], [limits] and [[rule]] tables")
    p.add_argument("--runtime-dir", metavar="DIR", help="where the socket and address file live (default: $XDG_RUNTIME_DIR/minibus)")
    p.add_argument("--authorized-keys", metavar="FILE", help="keys with every right (default: $XDG_CONFIG_HOME/minibus/authorized_keys)")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"], help="default: info")
    return p


def _parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--tcp wants HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def build_config(args: argparse.Namespace) -> tuple[BrokerConfig, str]:
    data: dict[str, Any] = {}
    if args.config:
        try:
            data = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{args.config}: {exc}") from exc
    section = data.get("broker", {})
    limits_section = data.get("limits", {})
    if not isinstance(section, dict) or not isinstance(limits_section, dict):
        raise ConfigError("[broker] and [limits] must be tables")
    runtime_dir = Path(args.runtime_dir or section.get("runtime_dir") or default_runtime_dir())
    unix_path = Path(args.unix or section.get("unix") or runtime_dir / "bus.sock")
    tcp: tuple[str, int] | None
    if args.no_tcp or section.get("tcp") is False:
        tcp = None
    else:
        tcp = _parse_hostport(args.tcp or section.get("tcp") or "127.0.0.1:7420")
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
    ak_path = args.authorized_keys or section.get("authorized_keys") or default_identity_path().parent / "authorized_keys"
    try:
        authorized = parse_authorized_keys(Path(ak_path).read_text(), str(ak_path)) if Path(ak_path).exists() else frozenset()
        policy = Policy.from_mapping(identity.public_key, data, authorized)
    except (PolicyError, OSError) as exc:
        raise ConfigError(str(exc)) from exc
    unknown = set(limits_section) - _LIMIT_KEYS - set(_TIMING_KEYS)
    if unknown:
        raise ConfigError(f"[limits]: unknown keys {sorted(unknown)}")
    try:
        limits = Limits(**{k: int(v) for k, v in limits_section.items() if k in _LIMIT_KEYS})
        timing = {k: kind(limits_section[k]) for k, kind in _TIMING_KEYS.items() if k in limits_section}
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[limits]: {exc}") from exc
    config = BrokerConfig(
        identity=identity,
        policy=policy,
        unix_path=unix_path,
        tcp=tcp,
        runtime_dir=runtime_dir,
        limits=limits,
        encrypt_unix=bool(section.get("encrypt_unix", False)),
    )
    if network_key is not None:
        config.network_key = network_key
    for key, value in timing.items():
        setattr(config, key, value)
    level = args.log_level or section.get("log_level") or "info"
    return config, level


async def run(config: BrokerConfig) -> None:
    broker = Broker(config)
    async with trio.open_nursery() as nursery:
        serve_scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
            with serve_scope:
                await broker.serve(task_status=task_status)

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            address = await nursery.start(serve)
            print(f"MINIBUS_ADDRESS={address}", flush=True)
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                break
        broker.begin_shutdown()
        with trio.move_on_after(config.close_timeout + 1):
            while broker.sessions:
                await trio.sleep(0.01)
        serve_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config, level = build_config(args)
    except ConfigError as exc:
        print(f"busd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=level.upper(), format="busd: %(levelname)s %(message)s", stream=sys.stderr)
    status = 0
    try:
        trio.run(run, config)
    except* BrokerAlreadyRunning as group:
        print(f"busd: {group.exceptions[0]}", file=sys.stderr)
        status = EXIT_RUNNING
    except* OSError as group:
        print(f"busd: cannot listen: {group.exceptions[0]}", file=sys.stderr)
        status = EXIT_CONFIG
    return status


if __name__ == "__main__":
    sys.exit(main())
