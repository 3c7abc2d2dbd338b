"""busd's installed plugins: reading service files, launching, supervising, stopping.

Theory of operation
-------------------
The broker core (sans-io) decides *when* a plugin is needed: it holds channel openings to an
activatable name nobody owns and emits :class:`~bus.core.activation.ServiceAction` items.
The :class:`Supervisor` is the trio side that carries them out:

* **service files** are read from each service directory (checked like the config file: the
  directory and every file must be the user's or root's and writable by nobody else), at start
  and on reload (SIGHUP, ``busctl reload``).  A bad file is one logged line naming the file and
  the field; the others still load.
* **one runner task per running plugin** launches its process (own session, so its own
  process group; stdin from /dev/null; stdout and stderr read into busd's log), waits for it
  to exit and restarts it as its ``restart`` field says, with exponential backoff
  (``restart_delay`` doubling to ``restart_delay_max``, back to the start once a process ran
  ``restart_reset`` seconds).  More than ``crash_loop_restarts`` restarts within
  ``crash_loop_window`` seconds is a crash loop: the plugin is marked failed and left stopped.
* **an activation** makes sure a runner exists and waits, under ``activation_timeout``, for
  the name to get an owner.  Everyone asking for the same name while one is in progress
  waits for that same launch.  If the process exits first, or the deadline passes, the
  requests held for the name fail with the exit status and the last lines of its stderr (and
  an on-demand plugin is stopped).
* **stopping** sends SIGTERM to the plugin's process group, then SIGKILL after its
  ``stop_timeout``.  busd stops every plugin before it closes its sockets; if busd itself is
  cancelled, whatever still runs gets SIGKILL.

A plugin's output never hurts busd: reads are bounded chunks, a line is cut at
``MAX_LINE`` characters, at most ``LOG_LINES_PER_SECOND`` lines a second are logged per
stream (the rest counted), and a stream that sends more than ``READ_BYTES_PER_SECOND`` is
simply read more slowly (the plugin's writes block; busd does not buffer them).
"""

from __future__ import annotations

import collections
import logging
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .core.activation import ServiceAction, ServiceState
from .core.broker import BrokerCore, Outgoing
from .core.services import SERVICE_FILE_BYTES, ServiceFileError, ServiceSpec, parse_service
from .errors import ActivationFailed, NameNotFound, RequestError
from .wire.files import LocalFileError, check_owned_dir, read_trusted_file

__all__ = ["Supervisor", "SupervisorSettings", "read_service_dirs", "default_service_dir"]

log = logging.getLogger("minibus.supervisor")
plugin_log = logging.getLogger("minibus.plugin")

#: Lines of a plugin's stderr kept for the error of a failed activation.
STDERR_TAIL = 10
#: A line of a plugin's output is cut at this many characters.
MAX_LINE = 1024
#: Lines of one stream of one plugin logged per second at most (the rest are counted).
LOG_LINES_PER_SECOND = 100
#: Bytes read from one stream of one plugin per second at most (then busd reads more slowly).
READ_BYTES_PER_SECOND = 1 << 20
#: Service files looked at per directory, at most.
FILES_PER_DIRECTORY = 1024
#: Seconds busd keeps reading a plugin's pipes after it exited (its children may hold them).
PIPE_GRACE = 0.5


def default_service_dir() -> Path:
    """``$XDG_DATA_HOME/minibus/services``, else ``~/.local/share/minibus/services``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "minibus" / "services"


def read_service_dirs(dirs: list[tuple[Path, bool]]) -> tuple[dict[str, ServiceSpec], list[str]]:
    """The service files of ``dirs`` (each with whether it was asked for explicitly: a missing
    default directory is no error); returns the specs by name and one line per problem.

    A name defined in an earlier directory (or by an earlier file, in name order) wins; the
    later file is reported and ignored."""
    specs: dict[str, ServiceSpec] = {}
    errors: list[str] = []
    for directory, explicit in dirs:
        try:
            check_owned_dir(directory, "service directory")
            names = sorted(n for n in os.listdir(directory) if n.endswith(".toml") and not n.startswith("."))
        except FileNotFoundError:
            if explicit:
                errors.append(f"{directory}: no such service directory")
            continue
        except LocalFileError as exc:
            errors.append(str(exc))
            continue
        except OSError as exc:
            errors.append(f"{directory}: cannot read the service directory: {exc.strerror or exc}")
            continue
        if len(names) > FILES_PER_DIRECTORY:
            errors.append(f"{directory}: more than {FILES_PER_DIRECTORY} service files; the rest are ignored")
            names = names[:FILES_PER_DIRECTORY]
        for filename in names:
            path = directory / filename
            try:
                spec = parse_service(read_trusted_file(path, "service file", max_bytes=SERVICE_FILE_BYTES), str(path))
            except (ServiceFileError, LocalFileError) as exc:
                errors.append(str(exc))
                continue
            except OSError as exc:
                errors.append(f"{path}: cannot read the service file: {exc.strerror or exc}")
                continue
            other = specs.get(spec.name)
            if other is not None:
                errors.append(f"{path}: name: {spec.name!r} is already defined by {other.path}; this file is ignored")
                continue
            specs[spec.name] = spec
    return specs, errors


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"


@dataclass
class SupervisorSettings:
    """How plugins are launched and supervised (busd's ``[limits]`` set them; docs/activation.md)."""

    dirs: list[tuple[Path, bool]] = field(default_factory=list)
    activation_timeout: float = 8.0
    restart_delay: float = 0.5
    restart_delay_max: float = 30.0
    restart_reset: float = 60.0
    crash_loop_restarts: int = 5
    crash_loop_window: float = 60.0
    #: The soft open-file limit a plugin gets (busd's own raised one is not passed on).
    plugin_nofile: int | None = None


class _Activation:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: str | None = None


class _Plugin:
    """One installed plugin's process and supervision (its state lives in the core's table)."""

    def __init__(self, spec: ServiceSpec, state: ServiceState) -> None:
        self.spec = spec
        self.state = state
        self.process: trio.Process | None = None
        self.wanted = False  # the runner restarts it while this holds
        self.scope: trio.CancelScope | None = None  # the runner's, while one runs
        self.runner_done = trio.Event()
        self.runner_done.set()
        self.exits = 0
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self.wakeup = trio.Event()
        self.activation: _Activation | None = None
        #: An administrator stopped it (busctl stop): nothing but busctl start runs it again
        #: (not a reload, not an opener).
        self.stopped_by_admin = False
        #: After a failed activation (on-demand plugins): openers get that failure without a
        #: new launch until ``retry_at`` (trio time), the pause doubling up to restart_delay_max.
        self.retry_at = 0.0
        self.retry_delay = 0.0
        self.last_failure = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def notify(self) -> None:
        """Something an activation waits for happened (an owner, an exit, the runner ended)."""
        self.wakeup.set()
        self.wakeup = trio.Event()

    def signal_group(self, signum: int) -> None:
        process = self.process
        if process is None:
            return
        try:
            os.killpg(process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def failure_text(self, why: str) -> str:
        lines = [line[:512] for line in self.tail]
        if not lines:
            return f"{why} (nothing on its stderr)"
        return f"{why}; last lines of its stderr: " + " | ".join(lines)


class Supervisor:
    def __init__(
        self,
        core: BrokerCore,
        dispatch: Callable[[list[Outgoing]], None],
        environment: Callable[[], dict[str, str]],
        settings: SupervisorSettings,
    ) -> None:
        self.core = core
        self.dispatch = dispatch
        self.environment = environment  # MINIBUS_ADDRESS and friends, once busd listens
        self.settings = settings
        self.plugins: dict[str, _Plugin] = {}
        self._nursery: trio.Nursery | None = None
        self.closing = False

    # -- service files ---------------------------------------------------------------------------

    def load(self) -> list[str]:
        """Read the service files (again); returns (and logs) one line per problem."""
        specs, errors = read_service_dirs(self.settings.dirs)
        for line in errors:
            log.error("service file: %s", line)
        gone, out = self.core.set_services(specs)
        for name, spec in specs.items():
            self.core.stats.plugins.known(name)  # shown at 0 in the metrics from now on
            plugin = self.plugins.get(name)
            if plugin is None:
                self.plugins[name] = _Plugin(spec, self.core.services.state(name))
            else:
                plugin.spec = spec  # takes effect at its next launch
        self.dispatch(out)
        for name in gone:
            plugin = self.plugins.get(name)
            if plugin is not None and self._nursery is not None:
                self._nursery.start_soon(self._retire, plugin)
        if self._nursery is not None:
            self._start_always()
        log.info("%d installed plugin%s", len(specs), "" if len(specs) == 1 else "s")
        return errors

    async def _retire(self, plugin: _Plugin) -> None:
        """Its service file is gone: stop it, then forget it (unless the file came back)."""
        await self.stop(plugin)
        if plugin.name not in self.core.services.specs:
            self.plugins.pop(plugin.name, None)
            self.core.services.forget(plugin.name)

    def _start_always(self) -> None:
        if self.closing:
            return
        for plugin in self.plugins.values():
            if plugin.spec.activation == "always" and plugin.name in self.core.services.specs and plugin.scope is None:
                if plugin.state.state != "failed" and not plugin.stopped_by_admin:
                    self._start_runner(plugin)

    # -- running ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the ``always`` plugins and serve activations until cancelled (then every
        plugin still running is killed)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._start_always()
            task_status.started()
            await trio.sleep_forever()

    def action(self, item: ServiceAction) -> None:
        """A :class:`ServiceAction` from the core (called from the broker's dispatch)."""
        plugin = self.plugins.get(item.name)
        if item.op == "owned":
            if plugin is not None:
                plugin.notify()
            return
        if item.op == "reload":
            if self.closing:
                self.dispatch(self.core.service_reply(item.conn, item.request, error=ActivationFailed("busd is shutting down")))
                return
            errors = self.load()
            self.dispatch(self.core.service_reply(item.conn, item.request, {"services": len(self.core.services.specs), "errors": errors}))
            return
        nursery = self._nursery
        if nursery is None or plugin is None or self.closing:
            why = "busd is shutting down" if self.closing else "busd is not supervising plugins yet"
            if item.op == "activate":
                self.dispatch(self.core.activation_failed(item.name, why))
            else:
                self.dispatch(self.core.service_reply(item.conn, item.request, error=ActivationFailed(why)))
            return
        if item.op == "activate":
            nursery.start_soon(self._activate_for_held, plugin)
        else:
            nursery.start_soon(self._command, plugin, item)

    async def _activate_for_held(self, plugin: _Plugin) -> None:
        """An opener asked for a plugin nobody owns.  Only an on-demand plugin is launched
        for it, and not while it is marked failed, stopped by an administrator, or pausing
        after a failed activation: openers cannot undo a crash-loop stop or fork a failing
        plugin at their own pace.  An always-on plugin that runs is waited for."""
        error = self._refusal(plugin)
        if error is None:
            if plugin.spec.activation == "always" and plugin.scope is None:
                error = f"{plugin.name} is an always-on plugin that is not running (busctl start runs it)"
            else:
                error = await self.activate(plugin)
                now = trio.current_time()
                if error is None:
                    plugin.retry_delay = 0.0
                elif plugin.spec.activation == "on-demand":
                    settings = self.settings
                    plugin.retry_delay = min(max(plugin.retry_delay * 2, settings.restart_delay), settings.restart_delay_max)
                    plugin.retry_at = now + plugin.retry_delay
                    plugin.last_failure = error
        if error is not None:
            self.dispatch(self.core.activation_failed(plugin.name, error))

    def _refusal(self, plugin: _Plugin) -> str | None:
        """Why an opener may not launch ``plugin`` now, if it may not."""
        if self.core.names.owner(plugin.name) is not None:
            return None
        if plugin.state.state == "failed":
            return f"it is marked failed ({plugin.state.failure}); an administrator can start it again (busctl start)"
        if plugin.stopped_by_admin:
            return "an administrator stopped it (busctl start runs it again)"
        wait = plugin.retry_at - trio.current_time()
        if wait > 0 and plugin.activation is None:
            return f"it failed to start {plugin.retry_delay - wait:.1f} s ago and is not tried again for {wait:.1f} s: {plugin.last_failure}"
        return None

    async def _command(self, plugin: _Plugin, item: ServiceAction) -> None:
        error: RequestError | None = None
        result: dict[str, Any] = {}
        try:
            if item.op in ("stop", "restart"):
                result["was"] = plugin.state.state
                plugin.stopped_by_admin = item.op == "stop"
                await self.stop(plugin)
            if item.op in ("start", "restart"):
                plugin.stopped_by_admin = False
                plugin.retry_at = plugin.retry_delay = 0.0
                if plugin.scope is not None and plugin.process is None and self.core.names.owner(plugin.name) is None:
                    await self.stop(plugin)  # waiting out a restart backoff: start it now instead
                why = await self.activate(plugin)
                if why is not None:
                    error = ActivationFailed(f"cannot start {plugin.name!r}: {why}")
            result.update(name=plugin.name, state=plugin.state.state, pid=plugin.state.pid)
        except Exception as exc:  # a bug here must not take busd down
            log.exception("%s %s failed", item.op, plugin.name)
            error = ActivationFailed(f"{item.op} {plugin.name!r} failed: internal error ({exc})")
        self.dispatch(self.core.service_reply(item.conn, item.request, result, error))

    async def activate(self, plugin: _Plugin) -> str | None:
        """Make sure the plugin runs and owns its name, within ``activation_timeout``;
        returns None, or why not.  Callers during one activation share its outcome."""
        if self.core.names.owner(plugin.name) is not None:
            return None
        current = plugin.activation
        if current is not None:
            await current.done.wait()
            return current.error
        current = plugin.activation = _Activation()
        try:
            current.error = await self._launch_and_wait(plugin)
        finally:
            plugin.activation = None
            current.done.set()
        return current.error

    async def _launch_and_wait(self, plugin: _Plugin) -> str | None:
        timeout = self.settings.activation_timeout
        launched = plugin.scope is None
        if launched:
            self._start_runner(plugin)
        exits = plugin.exits
        with trio.move_on_after(timeout):
            while True:
                if self.core.names.owner(plugin.name) is not None:
                    self._check_owner(plugin)
                    return None
                if plugin.exits > exits:
                    why = plugin.failure_text(plugin.state.last_exit or "it exited")
                    break
                if plugin.scope is None:
                    why = plugin.failure_text(plugin.state.failure or plugin.state.last_exit or "it is not running")
                    break
                await plugin.wakeup.wait()
        if self.core.names.owner(plugin.name) is not None:
            return None
        on_demand = plugin.spec.activation == "on-demand"
        if plugin.exits == exits and plugin.scope is not None:
            then = "it was stopped" if on_demand else "it keeps running"
            why = plugin.failure_text(f"it did not take its name within {timeout:g} s (the activation deadline); {then}")
        log.warning("activation of %s failed: %s", plugin.name, why)
        if on_demand:
            await self.stop(plugin)  # no restarts after a failed activation
        return why

    def _check_owner(self, plugin: _Plugin) -> None:
        """Log it when the name went to a connection other than the launched plugin's process
        group: owning is the policy's business (whoever may own the name may take it, and then
        gets what was held for it), but the operator should know."""
        owner_id = self.core.names.owner(plugin.name)
        owner = self.core.connections.get(owner_id) if owner_id is not None else None
        process = plugin.process
        if owner is None or process is None:
            return
        try:
            ours = owner.pid is not None and os.getpgid(owner.pid) == process.pid
        except OSError:
            ours = False
        if not ours:
            log.warning(
                "%s was taken by :%d (%s, pid %s), not by the plugin busd launched (pid %d); what was held for it goes there",
                plugin.name, owner.id, owner.key, owner.pid, process.pid,
            )

    def _start_runner(self, plugin: _Plugin) -> None:
        assert self._nursery is not None
        if self.closing:
            return  # stop_all has its list: nothing new starts behind it
        plugin.wanted = True
        plugin.scope = trio.CancelScope()
        plugin.runner_done = trio.Event()
        plugin.state.restarts = 0
        plugin.state.failure = None
        plugin.state.state = "starting"
        self._nursery.start_soon(self._runner, plugin, plugin.scope)

    async def _runner(self, plugin: _Plugin, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self._supervise(plugin)
        finally:
            plugin.scope = None
            plugin.wanted = False
            if plugin.state.state != "failed":
                plugin.state.state = "not running"
            plugin.runner_done.set()
            plugin.notify()

    async def _supervise(self, plugin: _Plugin) -> None:
        settings = self.settings
        delay = settings.restart_delay
        recent: collections.deque[float] = collections.deque()
        while plugin.wanted:
            started = trio.current_time()
            returncode = await self._run_once(plugin)
            if not plugin.wanted:
                return
            policy = plugin.spec.restart
            if policy == "never" or (policy == "on-failure" and returncode == 0):
                return
            now = trio.current_time()
            if now - started >= settings.restart_reset:
                delay = settings.restart_delay
            while recent and now - recent[0] > settings.crash_loop_window:
                recent.popleft()
            if len(recent) >= settings.crash_loop_restarts:
                plugin.state.state = "failed"
                plugin.state.failure = (
                    f"crash loop: {len(recent)} restarts within {settings.crash_loop_window:g} s, "
                    f"and it {plugin.state.last_exit} again"
                )
                log.error("plugin %s stopped and marked failed: %s", plugin.name, plugin.state.failure)
                return
            recent.append(now)
            plugin.state.state = "restarting"
            log.warning("plugin %s %s; restarting in %g s", plugin.name, plugin.state.last_exit, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, settings.restart_delay_max)
            plugin.state.restarts += 1
            self.core.stats.plugins.restarted(plugin.name)

    def _environment(self, spec: ServiceSpec) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MINIBUS_IDENTITY", None)
        env.update(spec.environment)
        env.update(self.environment())
        if spec.identity is not None:
            env["MINIBUS_IDENTITY"] = spec.identity
        return env

    async def _run_once(self, plugin: _Plugin) -> int | None:
        """Launch the plugin once and wait for its process to end; returns its exit code
        (None when it could not be started at all)."""
        spec, state = plugin.spec, plugin.state
        plugin.tail.clear()
        state.launches += 1
        self.core.stats.plugins.launched(plugin.name)
        try:
            process = await trio.lowlevel.open_process(
                list(spec.exec),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=spec.working_directory,
                env=self._environment(spec),
                start_new_session=True,
            )
        except OSError as exc:
            state.last_exit = f"could not be started: {spec.exec[0]}: {exc.strerror or exc}"
            log.error("plugin %s %s", plugin.name, state.last_exit)
            self.core.stats.plugins.failed(plugin.name)
            plugin.exits += 1
            plugin.notify()
            return None
        plugin.process = process
        if self.settings.plugin_nofile is not None:
            try:  # back to what busd was given, not what it raised its own limit to
                _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (self.settings.plugin_nofile, hard))
            except (OSError, ValueError) as exc:
                log.debug("plugin %s: open-file limit left as it is: %s", plugin.name, exc)
        state.pid, state.since = process.pid, time.time()
        state.state = "running"
        log.info("plugin %s started (pid %d): %s", plugin.name, process.pid, " ".join(spec.exec))
        try:
            async with trio.open_nursery() as nursery:
                assert process.stdout is not None and process.stderr is not None
                nursery.start_soon(self._pump, plugin, process.stdout, "stdout", process.pid)
                nursery.start_soon(self._pump, plugin, process.stderr, "stderr", process.pid)
                await process.wait()
                # Its children may hold the pipes open: read what is there, briefly.
                nursery.cancel_scope.deadline = trio.current_time() + PIPE_GRACE
        finally:
            # Cancelled (busd is going) or the leader is gone: what is left of its process
            # group goes too.
            plugin.signal_group(signal.SIGKILL)
            with trio.CancelScope(shield=True):
                await process.wait()
                for pipe in (process.stdout, process.stderr):
                    if pipe is not None:
                        await pipe.aclose()
            plugin.process = None
            state.pid = state.since = None
            state.last_exit = describe_exit(process.returncode) if process.returncode is not None else "ended"
            plugin.exits += 1
            plugin.notify()
        failed = process.returncode != 0 and plugin.wanted
        if failed:
            self.core.stats.plugins.failed(plugin.name)
        level = logging.WARNING if failed else logging.INFO
        log.log(level, "plugin %s (pid %d) %s", plugin.name, process.pid, state.last_exit)
        return process.returncode

    async def _pump(self, plugin: _Plugin, stream: trio.abc.ReceiveStream, which: str, pid: int) -> None:
        """Log a plugin's output one line at a time, bounded (see the module's docstring)."""
        partial = bytearray()
        cutting = False  # inside a line already cut: drop up to its end
        window_start = trio.current_time()
        window_bytes = window_lines = suppressed = 0

        def emit(raw: bytes, cut: bool) -> None:
            nonlocal window_lines, suppressed
            text = raw.decode("utf-8", "replace").rstrip("\r")
            text = "".join(c if c.isprintable() else "?" for c in text)
            if cut:
                text += " [line cut]"
            if which == "stderr":
                plugin.tail.append(text)
            if window_lines < LOG_LINES_PER_SECOND:
                window_lines += 1
                plugin_log.info("%s[%d] %s: %s", plugin.name, pid, which, text)
            else:
                suppressed += 1

        try:
            while True:
                data = await stream.receive_some(16384)
                if not data:
                    break
                now = trio.current_time()
                if now - window_start >= 1.0:
                    if suppressed:
                        log.warning("plugin %s: %d lines of %s not logged (over %d a second)", plugin.name, suppressed, which, LOG_LINES_PER_SECOND)
                    window_start, window_bytes, window_lines, suppressed = now, 0, 0, 0
                window_bytes += len(data)
                lines = data.split(b"\n")
                for piece in lines[:-1]:
                    if cutting:
                        cutting = False
                        partial.clear()
                        continue
                    partial += piece
                    emit(bytes(partial[:MAX_LINE]), len(partial) > MAX_LINE)
                    partial.clear()
                if not cutting:
                    partial += lines[-1]
                    if len(partial) > MAX_LINE:
                        emit(bytes(partial[:MAX_LINE]), True)
                        partial.clear()
                        cutting = True
                if window_bytes >= READ_BYTES_PER_SECOND:
                    await trio.sleep_until(window_start + 1.0)  # read more slowly: the plugin waits
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if partial and not cutting:
            emit(bytes(partial), False)
        if suppressed:
            log.warning("plugin %s: %d lines of %s not logged (over %d a second)", plugin.name, suppressed, which, LOG_LINES_PER_SECOND)

    # -- stopping --------------------------------------------------------------------------------

    async def stop(self, plugin: _Plugin) -> None:
        """SIGTERM to its process group, SIGKILL after ``stop_timeout``; no restart."""
        plugin.wanted = False
        scope = plugin.scope
        if scope is None:
            if plugin.state.state == "failed":
                plugin.state.state = "not running"
            return
        if plugin.process is not None:
            plugin.state.state = "stopping"
            log.info("stopping plugin %s (pid %d)", plugin.name, plugin.process.pid)
            plugin.signal_group(signal.SIGTERM)
            with trio.move_on_after(plugin.spec.stop_timeout) as waited:
                exits = plugin.exits
                while plugin.exits == exits and plugin.process is not None:
                    await plugin.wakeup.wait()
            if waited.cancelled_caught:
                log.warning("plugin %s did not stop within %g s of SIGTERM: SIGKILL", plugin.name, plugin.spec.stop_timeout)
                plugin.signal_group(signal.SIGKILL)
        scope.cancel()  # (also ends a backoff sleep)
        await plugin.runner_done.wait()
        plugin.state.state = "not running"

    async def stop_all(self) -> None:
        """Stop every plugin (in parallel), before busd closes its sockets."""
        self.closing = True
        async with trio.open_nursery() as nursery:
            for plugin in list(self.plugins.values()):
                if plugin.scope is not None:
                    nursery.start_soon(self.stop, plugin)

    def plugin(self, name: str) -> _Plugin:
        plugin = self.plugins.get(name)
        if plugin is None:
            raise NameNotFound(f"no installed plugin {name!r}")
        return plugin
