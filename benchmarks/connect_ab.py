"""Interleaved A/B of a connect's CPU: two trees of minibus side by side, beside a bare shs1 connect.

Usage::

    python benchmarks/connect_ab.py OLD_TREE NEW_TREE [--rounds 24] [--batch 100]

``OLD_TREE`` and ``NEW_TREE`` are checkouts of this repository (``git worktree add`` or ``git
archive REV | tar -x -C DIR``).  Each tree runs its own ``busd`` (``python -m bus``, Unix socket,
``--log-level warning``) and its own client process, which on command makes ``--batch`` connects
one after the other: ``open_bus(address, identity=..., name=<a fresh name>, reconnect=False)``
entered and left, as ``rpc.py``'s connect row does.  Beside them, a bare shs1 server and client
(``SecureStream`` over ``FdSocketStream.connect`` and, in the server, ``direct_handshake``
where the tree has it: the same handshake I/O as minibus's, from ``OLD_TREE``, or ``NEW_TREE``
with ``--bare new``) do the same number of bare
connects.  The three pairs take turns, in an order that alternates every round (the first round
only warms up), and each process's CPU per connect is read from ``/proc/PID/task/*/schedstat``
(every thread) around its batch.  On a shared machine, wall-clock rates swing from one second to
the next; CPU per connect measured this way, with both trees interleaved, holds to a few percent.

Printed: the median CPU per connect of each process, the median wall time per connect of each
batch (the connects are one at a time, so this is the serial path of both sides, waits included:
noisier than CPU on a shared machine), and the ratio of the bare connect's CPU (client + server)
to each tree's (client + busd), the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def cpu_ns(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass
    return total


# -- roles (each in its own process, run from a tree) -----------------------------------------


def role_client(address: str, key_file: str) -> None:
    import trio

    from clients import load_identity, open_bus

    owner = load_identity(key_file)
    count = 0

    async def main() -> None:
        nonlocal count
        print("ready", flush=True)
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                return
            for _ in range(int(line)):
                count += 1
                async with open_bus(address, identity=owner, name=f"org.bench.Conn{os.getpid()}x{count}", reconnect=False):
                    pass
            print("done", flush=True)

    trio.run(main)


def role_bare_server(path: str, seed_hex: str) -> None:
    import trio

    from bus.io.secure import SecureStream
    from bus.wire.identity import Identity

    identity = Identity.from_seed(bytes.fromhex(seed_hex))

    async def handle(stream: trio.SocketStream) -> None:
        try:  # (the handshake's I/O straight on the socket, as busd's, where the tree has it)
            secure = SecureStream.server(stream, identity, encrypted=False, direct_handshake=True)
        except TypeError:
            secure = SecureStream.server(stream, identity, encrypted=False)
        try:
            await secure.do_handshake()
            await secure.receive_some()  # until the client closes
        except Exception:
            pass
        finally:
            await trio.aclose_forcefully(secure)

    async def main() -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(1024)
        print("ready", flush=True)
        await trio.serve_listeners(handle, [trio.SocketListener(sock)])

    trio.run(main)


def role_bare_client(path: str, seed_hex: str) -> None:
    import trio

    from bus.io.fdpass import FdSocketStream
    from bus.io.secure import SecureStream
    from bus.wire.identity import Identity

    identity = Identity.from_seed(bytes.fromhex(seed_hex))
    connect_nowait = getattr(FdSocketStream, "connect_nowait", None)

    async def main() -> None:
        print("ready", flush=True)
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                return
            for _ in range(int(line)):
                # (minibus's client socket, connected at once where the tree can, as its client's)
                transport = (connect_nowait(path) if connect_nowait else None) or await FdSocketStream.connect(path)
                stream = SecureStream.client(transport, identity, identity.public_key, encrypted=False)
                await stream.do_handshake()
                await trio.aclose_forcefully(stream)
            print("done", flush=True)

    trio.run(main)


# -- the driver ---------------------------------------------------------------------------------


def start(argv: list[str], tree: str, env: dict[str, str], stdin: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv,
        cwd=tree,
        env=dict(env, PYTHONPATH=tree),
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )


def me(role: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", role, *args]


def run(old: str, new: str, rounds: int, batch: int, bare: str = "old") -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="connect-ab-"))
    seed = os.urandom(32).hex()
    key_file = tmp / "owner.key"
    subprocess.run(
        [sys.executable, "-c", "import sys; from bus.wire.identity import Identity, save_identity; "
         "save_identity(sys.argv[1], Identity.from_seed(bytes.fromhex(sys.argv[2])))", str(key_file), seed],
        cwd=old, env=dict(os.environ, PYTHONPATH=old), check=True,
    )
    config = tmp / "busd.toml"
    config.write_text("[limits]\nconnections_per_identity = 10000\n")  # sequential connects may overlap their closes
    procs: list[subprocess.Popen[str]] = []
    pairs: dict[str, tuple[subprocess.Popen[str], subprocess.Popen[str]]] = {}
    try:
        for label, tree in (("old", old), ("new", new)):
            run_dir = tmp / f"run-{label}"
            run_dir.mkdir(mode=0o700)
            env = dict(os.environ, XDG_CONFIG_HOME=str(tmp / "cfg"), XDG_RUNTIME_DIR=str(run_dir))
            busd = start([sys.executable, "-m", "bus", "--no-tcp", "--key", str(key_file), "--config", str(config),
                          "--runtime-dir", str(run_dir), "--log-level", "warning"], tree, env)
            procs.append(busd)
            assert busd.stdout is not None
            address = busd.stdout.readline().strip().split("=", 1)[1]
            client = start(me("client", address, str(key_file)), tree, env, stdin=True)
            procs.append(client)
            pairs[label] = (client, busd)
        bare_path = str(tmp / "bare.sock")
        bare_tree = new if bare == "new" else old
        bare_server = start(me("bare-server", bare_path, seed), bare_tree, dict(os.environ))
        procs.append(bare_server)
        assert bare_server.stdout is not None and bare_server.stdout.readline().strip() == "ready"
        bare_client = start(me("bare-client", bare_path, seed), bare_tree, dict(os.environ), stdin=True)
        procs.append(bare_client)
        pairs["bare"] = (bare_client, bare_server)
        for client, _ in pairs.values():
            assert client.stdout is not None and client.stdout.readline().strip() == "ready"

        cpu: dict[str, dict[str, list[float]]] = {k: {"client": [], "server": [], "wall": []} for k in pairs}
        order = ["old", "new", "bare"]
        for i in range(rounds + 1):
            for label in order if i % 2 == 0 else order[::-1]:
                client, server = pairs[label]
                assert client.stdin is not None and client.stdout is not None
                c0, s0 = cpu_ns(client.pid), cpu_ns(server.pid)
                w0 = time.perf_counter()
                client.stdin.write(f"{batch}\n")
                client.stdin.flush()
                answer = client.stdout.readline().strip()
                w1 = time.perf_counter()
                if answer != "done":
                    raise RuntimeError(f"{label}: the client said {answer!r}")
                c1, s1 = cpu_ns(client.pid), cpu_ns(server.pid)
                if i:  # (round 0 warms up)
                    cpu[label]["client"].append((c1 - c0) / batch / 1000)
                    cpu[label]["server"].append((s1 - s0) / batch / 1000)
                    cpu[label]["wall"].append((w1 - w0) / batch * 1e6)
        result: dict[str, Any] = {"rounds": rounds, "batch": batch, "us_cpu_per_connect": {}, "ratio": {}}
        for label in pairs:
            result["us_cpu_per_connect"][label] = {
                side: round(statistics.median(values), 1) for side, values in cpu[label].items()
            }
        for label in ("old", "new"):
            per_round = [
                (cpu["bare"]["client"][r] + cpu["bare"]["server"][r]) / (cpu[label]["client"][r] + cpu[label]["server"][r])
                for r in range(rounds)
            ]
            result["ratio"][label] = round(statistics.median(per_round), 3)
        return result
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        role, role_args = sys.argv[2], sys.argv[3:]
        roles: dict[str, Any] = {"client": role_client, "bare-server": role_bare_server, "bare-client": role_bare_client}
        roles[role](*role_args)
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("old", help="the tree measured as 'old' (a checkout of this repository)")
    parser.add_argument("new", help="the tree measured as 'new'")
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--batch", type=int, default=100, help="connects per process per round")
    parser.add_argument("--bare", choices=("old", "new"), default="old", help="the tree whose I/O the bare connect uses")
    args = parser.parse_args()
    result = run(str(Path(args.old).resolve()), str(Path(args.new).resolve()), args.rounds, args.batch, args.bare)
    per = result["us_cpu_per_connect"]
    print("us per connect (median of rounds)       client    busd / server   wall")
    for label, name in (("old", "old tree"), ("new", "new tree"), ("bare", "bare shs1 connect")):
        print(f"  {name:36s} {per[label]['client']:7.1f} {per[label]['server']:9.1f} {per[label]['wall']:9.1f}")
    print(f"ratio of CPU, bare over minibus (median of rounds): old {result['ratio']['old']:.3f}, new {result['ratio']['new']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
