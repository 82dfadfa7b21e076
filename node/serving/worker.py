"""One model's inference in a child process: a native crash there ends that process, never the node.

Parent and child talk over a socketpair with `multiprocessing.connection` framing (pickled tuples):

    parent -> child  ("gen", SlotRequest) | ("cancel", request_id) | ("stop",)
    child -> parent  ("ready", info) | ("load_failed", message) | ("step", events, sampled, running, waiting)

One "step" message carries every event of one decode step, so streaming costs one small write per step.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from node.serving.batching import Done, Failed, SlotRequest, StepEvent

log = logging.getLogger(__name__)

# Restarts closer together than this count as a crash loop and back off.
CRASH_WINDOW_S = 60.0
CRASHES_BEFORE_BACKOFF = 3
MAX_BACKOFF_S = 30.0
READY_TIMEOUT_S = 300.0
TOKENS_WINDOW_S = 10.0


@dataclass(frozen=True)
class WorkerConfig:
    """How the child loads its model and context."""

    model_path: str
    n_ctx: int
    parallel: int
    n_threads: int | None
    n_gpu_layers: int
    safe_cpu_kernels: bool


@dataclass(frozen=True)
class WorkerInfo:
    """What a started child reports about its context."""

    pid: int
    n_ctx: int
    parallel: int
    kv_bytes_per_token: int
    safe_cpu_kernels: bool


class WorkerCrashed(Exception):
    """The worker process died with requests in flight."""


Sink = Callable[[StepEvent | WorkerCrashed], None]


def signal_name(returncode: int | None) -> str:
    """`SIGILL` for -4, `exit 3` for 3."""
    if returncode is not None and returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


class ModelWorker:
    """The parent's handle on one model's worker process: submit, cancel, restart after a crash."""

    def __init__(self, name: str, config: WorkerConfig) -> None:
        self.name = name
        self._config = config
        self._lock = threading.Lock()
        self._sinks: dict[int, Sink] = {}
        self._conn: Connection | None = None
        self._process: subprocess.Popen | None = None
        self._closing = False
        self._closed = threading.Event()
        self._crash_times: deque[float] = deque(maxlen=CRASHES_BEFORE_BACKOFF)
        self._steps: deque[tuple[float, int]] = deque()
        self.restarts = 0
        self.last_crash: str | None = None
        self.running = 0
        self.waiting = 0
        self.info: WorkerInfo | None = None
        self._steps_since_start = 0
        self._ready = threading.Event()
        self._start()
        self._thread = threading.Thread(target=self._read_loop, name=f"worker-{name}", daemon=True)
        self._thread.start()

    # ---- lifecycle -----------------------------------------------------------------------

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> WorkerInfo:
        """Block until the child has loaded its model (raises on a load failure)."""
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"worker for {self.name} did not load its model within {timeout_s:.0f} s")
        if self.info is None:
            raise RuntimeError(f"worker for {self.name} failed to load: {self.last_crash}")
        return self.info

    @property
    def pid(self) -> int | None:
        """The worker process id, None while restarting."""
        process = self._process
        return process.pid if process is not None else None

    def _start(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        config = self._config
        args = [
            sys.executable, "-m", "node.serving.worker", str(child_sock.fileno()), config.model_path, str(config.n_ctx),
            str(config.parallel), str(config.n_threads or 0), str(config.n_gpu_layers), str(int(config.safe_cpu_kernels)),
        ]
        # The child imports this package from wherever the parent did, installed or not.
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        process = subprocess.Popen(args, pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL, env=env)
        child_sock.close()
        with self._lock:
            self._process = process
            self._conn = Connection(parent_sock.detach())
            self._steps_since_start = -1  # -1: not ready yet

    def close(self) -> None:
        """Stop the child and the reader thread; in-flight requests end with an error."""
        self._closing = True
        self._closed.set()
        with self._lock:
            conn, process = self._conn, self._process
        if conn is not None:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        if process is not None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._thread.join(timeout=10)

    # ---- requests ------------------------------------------------------------------------

    def submit(self, request: SlotRequest, sink: Sink) -> None:
        """Send a request to the child; its events go to `sink` (called on the reader thread)."""
        with self._lock:
            if self._conn is None or self._closing:
                state = "out of service" if self._closing else "restarting"
                raise WorkerCrashed(f"the worker of {self.name} is {state}")
            self._sinks[request.request_id] = sink
            try:
                self._conn.send(("gen", request))
            except OSError as exc:
                self._sinks.pop(request.request_id, None)
                raise WorkerCrashed(f"the worker of {self.name} is gone: {exc}") from exc

    def cancel(self, request_id: int) -> None:
        """Forget a request; the child frees its slot before the next decode step."""
        with self._lock:
            if self._sinks.pop(request_id, None) is None or self._conn is None:
                return
            try:
                self._conn.send(("cancel", request_id))
            except OSError:
                pass  # the reader thread sees the crash

    def tokens_per_s(self) -> float:
        """Tokens sampled per second over the last few seconds of work (all slots together)."""
        now_s = time.monotonic()
        with self._lock:
            steps = [step for step in self._steps if step[0] >= now_s - TOKENS_WINDOW_S]
        if len(steps) < 2:
            return 0.0
        span_s = steps[-1][0] - steps[0][0]
        return sum(n for _, n in steps[1:]) / span_s if span_s > 0 else 0.0

    # ---- the reader thread ---------------------------------------------------------------

    def _read_loop(self) -> None:
        while True:
            conn = self._conn
            assert conn is not None  # set by _start before this thread runs
            try:
                while True:
                    self._handle(conn.recv())
            except (EOFError, OSError):
                pass
            except Exception:  # noqa: BLE001 - a garbled message: this worker cannot be trusted any more
                log.exception("bad message from the worker of %s; killing it", self.name)
                if self._process is not None:
                    self._process.kill()
            process = self._process
            returncode = process.wait() if process is not None else None
            conn.close()
            if self._closing or not self._crashed(returncode):
                self._fail_all(WorkerCrashed(f"expert {self.name} is shutting down"))
                self._ready.set()
                return

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":
            _, events, sampled, running, waiting = message
            self.running, self.waiting = running, waiting
            self._steps_since_start += 1
            now_s = time.monotonic()
            with self._lock:
                self._steps.append((now_s, sampled))
                while self._steps and self._steps[0][0] < now_s - TOKENS_WINDOW_S:
                    self._steps.popleft()
            for event in events:
                with self._lock:
                    sink = self._sinks.get(event.request_id)
                    if isinstance(event, (Done, Failed)):
                        self._sinks.pop(event.request_id, None)
                if sink is not None:
                    sink(event)
        elif kind == "ready":
            self.info = message[1]
            self._steps_since_start = 0
            self._ready.set()
        elif kind == "load_failed":
            self.last_crash = message[1]
            log.error("worker of %s could not load its model: %s", self.name, message[1])
            self._closing = True
            self._ready.set()

    def _fail_all(self, error: WorkerCrashed) -> None:
        with self._lock:
            sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink(error)

    def _crashed(self, returncode: int | None) -> bool:
        """Fail what was in flight, then start a new child (with safe CPU kernels after a kernel fault);
        False when the expert was closed meanwhile."""
        cause = signal_name(returncode)
        with self._lock:
            self._conn, self._process = None, None
        self.running = self.waiting = 0
        self.restarts += 1
        self.last_crash = cause
        log.error("the inference worker of %s died (%s); restarting it", self.name, cause)
        self._fail_all(WorkerCrashed(f"expert {self.name} crashed ({cause}) and is restarting"))
        # Repacked CPU kernels (AMX and friends) on a CPU or VM that cannot run them die with SIGILL, or with
        # SIGSEGV/SIGBUS at their first use: the warm-up before "ready", or the first decode step.
        kernel_fault = returncode == -signal.SIGILL or (
            returncode in (-signal.SIGSEGV, -signal.SIGBUS) and self._steps_since_start <= 0
        )
        if kernel_fault and not self._config.safe_cpu_kernels:
            log.warning("%s: %s in llama.cpp's CPU kernels; restarting with safe CPU kernels", self.name, cause)
            self._config = WorkerConfig(**{**self._config.__dict__, "safe_cpu_kernels": True})
        elif self._steps_since_start < 0:
            # It died loading or warming up, with nothing left to change: another start would do the same.
            log.error("the worker of %s cannot start (%s); the expert is out of service", self.name, cause)
            self._closing = True
            return False
        now_s = time.monotonic()
        self._crash_times.append(now_s)
        if len(self._crash_times) == CRASHES_BEFORE_BACKOFF and now_s - self._crash_times[0] < CRASH_WINDOW_S:
            delay_s = min(MAX_BACKOFF_S, 2.0 ** min(self.restarts, 5))
            log.warning("%s crashed %d times within %.0f s; waiting %.0f s", self.name, CRASHES_BEFORE_BACKOFF, CRASH_WINDOW_S, delay_s)
            self._closed.wait(delay_s)  # close() cuts the wait short
        if self._closing:
            return False
        self._start()
        return True


# ---- the child ---------------------------------------------------------------------------


def _child_main(argv: list[str]) -> int:
    """Load the model, then serve requests until told to stop or the parent goes away."""
    from llama_cpp._logger import set_verbose

    from node.serving.batching import BatchScheduler

    set_verbose(False)  # llama.cpp's load and context chatter; errors still reach stderr
    fd, model_path, n_ctx, parallel, n_threads, n_gpu_layers, safe = argv
    conn = Connection(int(fd))
    try:
        scheduler = BatchScheduler(
            model_path,
            n_ctx=int(n_ctx),
            parallel=int(parallel),
            n_threads=int(n_threads) or None,
            n_gpu_layers=int(n_gpu_layers),
            safe_cpu_kernels=bool(int(safe)),
        )
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides what to do
        conn.send(("load_failed", f"{type(exc).__name__}: {exc}"))
        return 1
    scheduler.warm_up()
    conn.send(("ready", WorkerInfo(os.getpid(), scheduler.n_ctx, scheduler.parallel, scheduler.kv_bytes_per_token, bool(int(safe)))))
    try:
        while True:
            # Block while idle; between steps only take what has already arrived.
            if scheduler.idle and not _handle_child(conn.recv(), scheduler, conn):
                return 0
            while conn.poll():
                if not _handle_child(conn.recv(), scheduler, conn):
                    return 0
            events, sampled = scheduler.step()
            if events or sampled:
                conn.send(("step", events, sampled, scheduler.running, scheduler.waiting))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return 0  # the parent went away
    finally:
        scheduler.close()


def _handle_child(message: tuple, scheduler, conn: Connection) -> bool:
    """Apply one parent message; False means stop."""
    kind = message[0]
    if kind == "gen":
        failed = scheduler.submit(message[1])
        if failed:
            conn.send(("step", failed, 0, scheduler.running, scheduler.waiting))
    elif kind == "cancel":
        scheduler.cancel(message[1])
    elif kind == "stop":
        return False
    return True


if __name__ == "__main__":
    # Ctrl-C in a terminal reaches the whole process group: the node, not its worker, decides when it stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING)
    # Through the package, so what the child pickles names node.serving.worker, not __main__.
    from node.serving.worker import _child_main as child_main

    sys.exit(child_main(sys.argv[1:]))
