"""What serving metrics costs a message: relayed RPC through busd without and with ``--metrics``.

Two minibus stacks run side by side in one run, each its own set of processes: ``busd``, a
``clients.rpc.Service`` with ``echo(value: bytes) -> bytes``, and a caller making relayed calls
(``route="relay"``: every call crosses the broker twice, the path the counters sit on).  Stack A's
busd runs without ``--metrics``; stack B's with ``--metrics 127.0.0.1:0`` while a scraper process
fetches ``/metrics`` every 100 ms for the whole run (ten times what a Prometheus server does at a
1 s interval).  Rows alternate between the stacks (A B, then B A, ...) and each keeps its best
round.  Per row: calls/s, busd's CPU microseconds per call (utime + stime from /proc), and the
ratios with / without.

    python benchmarks/metrics.py            # about 50 s
    python benchmarks/metrics.py --quick    # about 10 s
    python benchmarks/metrics.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import emit_json  # noqa: E402

SERVICE = "org.bench.Metered"
PAYLOAD = b"x" * 64
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def say(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- roles (each its own process) -----------------------------------------------------------------


def role_service(address: str, key_file: str) -> None:
    import trio

    from clients import Service, load_identity, open_bus

    service = Service(SERVICE, description="echoes (benchmark)")

    @service.method
    async def echo(value: bytes) -> bytes:
        return value

    async def main() -> None:
        async with open_bus(address, identity=load_identity(key_file), name=service.name, info=service.info) as bus:
            service.attach(bus)
            say("ready")
            await trio.sleep_forever()

    trio.run(main)


def role_caller(address: str, key_file: str) -> None:
    """Relayed calls on command: one JSON line in (``{seconds, in_flight}``), one out."""
    import trio

    from clients import load_identity, open_bus
    from clients.rpc import RpcConnection

    async def main() -> None:
        async with open_bus(address, identity=load_identity(key_file)) as bus:
            rpc = RpcConnection(await bus.open_channel(SERVICE, "rpc", "relay"))
            async with trio.open_nursery() as nursery:
                await nursery.start(rpc.run)
                assert rpc.channel.route == "relay"
                assert await rpc.call("echo", PAYLOAD) == PAYLOAD
                say("ready")
                stdin = trio.lowlevel.FdStream(os.dup(0))
                buffer = b""
                while True:
                    chunk = await stdin.receive_some(4096)
                    if not chunk:
                        break
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        cmd = json.loads(line)
                        say(await _rate(rpc, cmd["seconds"], cmd["in_flight"]))
                nursery.cancel_scope.cancel()

    async def _rate(rpc: RpcConnection, seconds: float, in_flight: int) -> dict[str, Any]:
        calls = 0
        end = trio.current_time() + seconds

        async def loop() -> None:
            nonlocal calls
            while trio.current_time() < end:
                await rpc.call("echo", PAYLOAD)
                calls += 1

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(in_flight):
                nursery.start_soon(loop)
        return {"calls": calls, "seconds": trio.current_time() - started}

    trio.run(main)


def role_scraper(url: str, interval: str) -> None:
    """Fetch ``url`` every ``interval`` seconds until stdin closes; report what it got."""
    import select
    import urllib.request

    scrapes = failures = size = 0
    while True:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                size = len(response.read())
            scrapes += 1
        except OSError:
            failures += 1
        left = float(interval) - (time.monotonic() - started)
        ready, _, _ = select.select([sys.stdin], [], [], max(0.0, left))
        if ready and not sys.stdin.readline():
            break
    say({"scrapes": scrapes, "failures": failures, "page_bytes": size})


# -- the driver -----------------------------------------------------------------------------------


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str], stdin: bool = False) -> None:
        self.popen = subprocess.Popen(
            argv, env=env, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )
        assert self.popen.stdout is not None
        self.first = self.popen.stdout.readline().strip()
        if not self.first:
            raise RuntimeError(f"{argv[3:5]} did not start (exit {self.popen.wait()})")

    def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(json.dumps(cmd) + "\n")
        self.popen.stdin.flush()
        answer: dict[str, Any] = json.loads(self.popen.stdout.readline())
        return answer

    def stop(self) -> None:
        if self.popen.stdin is not None:
            self.popen.stdin.close()
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def me(role: str, *args: str) -> list[str]:
    return [sys.executable, __file__, "--role", role, *args]


class Stack:
    """busd, the service and the caller; with ``metrics``, busd serves /metrics too."""

    def __init__(self, tmp: Path, metrics: bool) -> None:
        from bus.wire.identity import Identity, save_identity

        tmp.mkdir()
        (tmp / "run").mkdir(mode=0o700)
        key = tmp / "owner.key"
        save_identity(key, Identity.generate())
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, XDG_CONFIG_HOME=str(tmp / "cfg"), XDG_RUNTIME_DIR=str(tmp / "run"), PYTHONPATH=root)
        argv = [sys.executable, "-m", "bus", "--no-tcp", "--key", str(key), "--runtime-dir", str(tmp / "run"), "--log-level", "warning"]
        if metrics:
            argv += ["--metrics", "127.0.0.1:0"]
        self.procs: list[Proc] = []
        try:
            self.busd = self._start(argv, env)
            self.address = self.busd.first.split("=", 1)[1]
            self.metrics_url = None
            if metrics:
                assert self.busd.popen.stdout is not None
                self.metrics_url = self.busd.popen.stdout.readline().strip().split("=", 1)[1]
            self._start(me("service", self.address, str(key)), env)
            self.caller = self._start(me("caller", self.address, str(key)), env, stdin=True)
        except BaseException:
            self.stop()
            raise

    def _start(self, argv: list[str], env: dict[str, str], stdin: bool = False) -> Proc:
        proc = Proc(argv, env, stdin)
        self.procs.append(proc)
        return proc

    def busd_cpu(self) -> float:
        fields = Path(f"/proc/{self.busd.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def measure(self, seconds: float, in_flight: int) -> dict[str, float]:
        cpu = self.busd_cpu()
        result = self.caller.ask({"seconds": seconds, "in_flight": in_flight})
        cpu = self.busd_cpu() - cpu
        calls = result["calls"]
        return {"calls_per_s": calls / result["seconds"], "busd_cpu_us_per_call": 1e6 * cpu / max(calls, 1)}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def run(args: argparse.Namespace) -> None:
    seconds = 0.5 if args.quick else 2.0
    rounds = 1 if args.quick else args.rounds
    rows = [("relay x1", 1), ("relay x32", 32)]
    with tempfile.TemporaryDirectory(prefix="minibus-metrics-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        plain = Stack(tmp / "plain", metrics=False)
        metered = Stack(tmp / "metered", metrics=True)
        assert metered.metrics_url is not None
        scraper = subprocess.Popen(me("scraper", metered.metrics_url, "0.1"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            for stack in (plain, metered):  # warm up both
                stack.measure(0.3, 1)
            best: dict[str, dict[str, dict[str, float]]] = {}
            every: list[dict[str, Any]] = []
            for round_no in range(rounds):
                for name, in_flight in rows:
                    order = [("without", plain), ("with", metered)]
                    if round_no % 2:
                        order.reverse()
                    for label, stack in order:
                        figures = stack.measure(seconds, in_flight)
                        every.append({"round": round_no, "row": name, "metrics": label, **figures})
                        kept = best.setdefault(name, {}).get(label)
                        if kept is None or figures["calls_per_s"] > kept["calls_per_s"]:
                            best[name][label] = figures
            # Idle: no calls, so busd's CPU is its housekeeping, plus the scrapes for stack B.
            idle = {}
            idle_seconds = 1.0 if args.quick else 5.0  # CPU time comes in 10 ms ticks
            for label, stack in (("without", plain), ("with", metered)):
                cpu = stack.busd_cpu()
                time.sleep(idle_seconds)
                idle[label] = (stack.busd_cpu() - cpu) / idle_seconds
            assert scraper.stdin is not None and scraper.stdout is not None
            scraper.stdin.close()
            scraped = json.loads(scraper.stdout.readline())
        finally:
            if scraper.poll() is None:
                scraper.terminate()
            scraper.wait(timeout=10)
            if scraper.stdout is not None:
                scraper.stdout.close()
            metered.stop()
            plain.stop()
    print(f"relayed RPC (64-byte echo), best of {rounds} round(s) of {seconds:g} s; with: --metrics, scraped every 100 ms")
    print(f"{'row':<10} {'calls/s without':>16} {'calls/s with':>13} {'ratio':>6}   {'busd us/call without':>21} {'with':>6} {'ratio':>6}")
    table = []
    for name, _ in rows:
        without, with_ = best[name]["without"], best[name]["with"]
        ratio = with_["calls_per_s"] / without["calls_per_s"]
        cpu_ratio = with_["busd_cpu_us_per_call"] / max(without["busd_cpu_us_per_call"], 1e-9)
        print(
            f"{name:<10} {without['calls_per_s']:>16,.0f} {with_['calls_per_s']:>13,.0f} {ratio:>6.3f}   "
            f"{without['busd_cpu_us_per_call']:>21.1f} {with_['busd_cpu_us_per_call']:>6.1f} {cpu_ratio:>6.3f}"
        )
        table.append({"row": name, "without": without, "with": with_, "ratio_calls": ratio, "ratio_busd_cpu_per_call": cpu_ratio})
    per_scrape = (idle["with"] - idle["without"]) / 10 * 1e3  # 10 scrapes a second
    print(f"scraper: {scraped['scrapes']} scrapes ({scraped['failures']} failed), page {scraped['page_bytes']} bytes")
    print(
        f"idle busd CPU: {idle['without'] * 100:.2f}% without, {idle['with'] * 100:.2f}% with 10 scrapes/s "
        f"(about {per_scrape:.2f} ms of busd CPU per scrape)"
    )
    emit_json({"rows": table, "scraper": scraped, "idle_busd_cpu": idle, "ms_per_scrape": per_scrape, "rounds": every}, args.json)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="one short round")
    p.add_argument("--rounds", type=int, default=4, help="rounds per row, alternating the order (default 4)")
    p.add_argument("--json", metavar="FILE", help="also write the JSON here")
    args, rest = p.parse_known_args()
    if args.role == "service":
        role_service(*rest)
    elif args.role == "caller":
        role_caller(*rest)
    elif args.role == "scraper":
        role_scraper(*rest)
    else:
        run(args)


if __name__ == "__main__":
    main()
