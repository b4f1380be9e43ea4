"""A warm `edgekit` process that forks one child per command line, for the bad-input matrix.

Starting Python and importing torch + transformers costs about 3 s of CPU; the matrix has dozens of
rows. This server imports the CLI and everything the load path pulls in once, then for each request
forks: the child is a separate process with its own working folder, environment, stdout/stderr files
and exit status, and runs the unmodified `edgekit.cli.main`. An exception escaping `main` is printed
as Python would print it (a traceback on stderr, status 1), so "no traceback" still means something.
The test runs a few rows through a fresh `edgekit` executable as well, for the start-up path.

Protocol: one JSON object per line on stdin, one JSON line back on stdout:
  {"argv", "cwd", "env", "out", "err", "timeout"} → {"rc"} when the command ends (-9: killed at timeout);
  {"spawn": {same}} → {"pid"} at once (the test may signal that pid), then {"wait": pid} → {"rc"}.
`--hooks` also loads tests/pause_export.py (inert unless a command's env sets EDGEKIT_TEST_PAUSE_AT).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path


def _warm() -> None:
    import edgekit.cli  # noqa: F401 - every command module
    from edgekit.checkpoint.load import open_checkpoint
    from edgekit.checkpoint.registry import ALIASES

    open_checkpoint(ALIASES["stories260k"].embedded_path, "warm-up")  # transformers' llama config, safetensors


def _child(req: dict) -> int:
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    tempfile.tempdir = None  # re-read $TMPDIR
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, req["out"], 0), (2, req["err"], 0)):
        flags = mode if path == os.devnull else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        os.dup2(os.open(path, flags, 0o644), fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.argv = ["edgekit", *req["argv"]]
    try:
        from edgekit.cli import main

        main(req["argv"])
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def _spawn(req: dict) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _child(req)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.01)


def main() -> None:
    if "--hooks" in sys.argv:
        import pause_export  # noqa: F401 - wraps export stages with named pause points

    _warm()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if "wait" in req:
            reply = {"rc": _wait(req["wait"], req.get("timeout", 300))}
        elif "spawn" in req:
            reply = {"pid": _spawn(req["spawn"])}
        else:
            reply = {"rc": _wait(_spawn(req), req.get("timeout", 300))}
        print(json.dumps(reply), flush=True)


class Zygote:
    """The test side: start the server, run or spawn commands in it."""

    def __init__(self, hooks: bool = False) -> None:
        import subprocess

        args = [sys.executable, __file__, *(["--hooks"] if hooks else [])]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    @staticmethod
    def request(argv: list[str], cwd: Path, env: dict[str, str], out: Path, err: Path) -> dict:
        return {"argv": argv, "cwd": str(cwd), "env": env, "out": str(out), "err": str(err), "timeout": 300}

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], out: Path, err: Path) -> int:
        return self._ask(self.request(argv, cwd, env, out, err))["rc"]

    def spawn(self, argv: list[str], cwd: Path, env: dict[str, str], out: Path, err: Path) -> int:
        return self._ask({"spawn": self.request(argv, cwd, env, out, err)})["pid"]

    def wait(self, pid: int, timeout: float = 300) -> int:
        return self._ask({"wait": pid, "timeout": timeout})["rc"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    main()
