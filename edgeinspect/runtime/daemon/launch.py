"""Start a daemon as a child process and wait until it serves (benchmarks, tests, scripts).

The child is `python -m edgeinspect.runtime.daemon.cli serve ...` (the same code as `edgeinspect serve`); it
prints one line `edgeinspect serve: ready: inspect <endpoint>, publish <endpoint> (...)` on stdout once
the model is loaded and the sockets are bound; `start_daemon` returns then, with the real endpoints
(a bind to port `*` gets its port from the system).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

READY = re.compile(r"ready: inspect (\S+?)(?:, publish (\S+))? \(")


class LaunchError(RuntimeError):
    pass


@dataclass
class DaemonProcess:
    process: subprocess.Popen
    endpoint: str
    pub_endpoint: str | None
    output: deque = field(default_factory=lambda: deque(maxlen=400))  # the child's last lines (stdout+stderr)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain) and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> int:
        if self.alive():
            self.process.kill()
        return self.process.wait()

    def log(self) -> str:
        return "\n".join(self.output)


def _pump(stream, sink: deque, ready: list, event: threading.Event) -> None:
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        sink.append(line)
        m = READY.search(line)
        if m and not event.is_set():
            ready.append((m.group(1), m.group(2)))
            event.set()
    stream.close()


def start_daemon(bundle: str | Path, *args: str, bind: str = "tcp://127.0.0.1:*", pub: str | None = None,
                 timeout_s: float = 120.0, env: dict[str, str] | None = None,
                 nice: int = 0, python: str | Path | None = None) -> DaemonProcess:
    """Start `edgeinspect serve --bundle BUNDLE --bind BIND --pub PUB ARGS...` and wait until it is ready.
    pub=None gives no PUB socket (`--pub none`). `python`: the interpreter to run it with (default this one;
    e.g. the lean serving environment's, .venv-serve/bin/python, with edgeinspect installed in it)."""
    cmd = [str(python or sys.executable), "-m", "edgeinspect.runtime.daemon.cli", "serve", "--bundle", str(bundle), "--bind", bind,
           "--pub", pub or "none", *args]
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    pre = (lambda: os.nice(nice)) if nice else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env,
                            preexec_fn=pre)
    out: deque = deque(maxlen=400)
    ready: list = []
    event = threading.Event()
    threading.Thread(target=_pump, args=(proc.stdout, out, ready, event), daemon=True).start()
    t_end = time.monotonic() + timeout_s
    while not event.wait(0.05):
        if proc.poll() is not None:
            time.sleep(0.1)  # let the pump read the last lines
            raise LaunchError(f"daemon exited with code {proc.returncode} before it was ready:\n" + "\n".join(out))
        if time.monotonic() > t_end:
            proc.kill()
            proc.wait()
            raise LaunchError(f"daemon not ready after {timeout_s:.0f} s:\n" + "\n".join(out))
    endpoint, pub_endpoint = ready[0]
    return DaemonProcess(proc, endpoint, pub_endpoint, out)
