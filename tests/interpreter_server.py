"""A fork server for the Triton-interpreter runs of the kernel tests (`run_interpreted` in conftest.py).

Each group of interpreted comparisons runs as `python SCRIPT ARGS` in a fresh process, with TRITON_INTERPRET=1
set before triton is first imported. Starting Python and importing torch is ~4 s of CPU per run, and the suite
has a dozen runs; this process imports torch (not triton, not moai_lib) once, then forks one child per request.
The child runs SCRIPT as `__main__` as `python SCRIPT ARGS` would (sys.argv, sys.path[0] = the script's
directory), so each run still starts from a process that has done nothing but import torch: nothing one run
imports, patches or seeds is seen by the next.

Protocol: one JSON request per line on stdin, {"script", "args", "timeout"}; one JSON reply per line on stdout,
{"returncode", "stdout", "stderr"} (returncode -N: the child was killed by signal N, SIGALRM on timeout).
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import tempfile
import traceback

import numpy  # noqa: F401
import pytest  # noqa: F401  (every test file imports it)
import torch  # noqa: F401


def _child(script: str, args: list[str], timeout: int, out_fd: int, err_fd: int) -> None:
    """In the forked child: run `script` as __main__ with its output in the two files; never returns."""
    signal.alarm(timeout)  # SIGALRM's default action ends the child
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    sys.stdin = open(os.devnull)  # the requests are the server's, not the child's
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # reported as `python SCRIPT` would: traceback, exit 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(request: dict) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(request["script"], request["args"], request["timeout"], out.fileno(), err.fileno())
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {"returncode": os.waitstatus_to_exitcode(status), "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules:
        raise SystemExit("run with TRITON_INTERPRET=1, before anything imports triton")
    for line in sys.stdin:
        print(json.dumps(_run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
