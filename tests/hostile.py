"""Helpers for the hostile-input tests: run a command line in a subprocess and check that it
failed the way a user should see it (non-zero exit, a few lines on stderr, no traceback, a
message naming the problem)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# As root, chmod 000 does not stop reads: permission tests run the command without the
# capabilities that bypass file permissions (util-linux's setpriv).
SETPRIV = shutil.which("setpriv")
NO_DAC = [SETPRIV, "--bounding-set=-dac_override,-dac_read_search"] if SETPRIV else None


def can_drop_privileges() -> bool:
    """Whether permission errors can be provoked here (not root, or root with setpriv)."""
    return os.geteuid() != 0 or NO_DAC is not None


def run(argv: list[str], timeout: float = 300, unprivileged: bool = False, env: dict | None = None,
        cwd: str = ROOT, stdin=None) -> subprocess.CompletedProcess:
    """Run argv (a list, the program first) with the repository on the path."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("TRITON_INTERPRET", "1")
    full_env.update(env or {})
    if unprivileged and os.geteuid() == 0:
        assert NO_DAC is not None, "setpriv is needed to test permission errors as root"
        argv = NO_DAC + argv
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=full_env,
                          stdin=subprocess.DEVNULL if stdin is None else stdin)


def cli(*args, **kw) -> subprocess.CompletedProcess:
    """`python -m vtprune ARGS...`"""
    return run([sys.executable, "-m", "vtprune", *map(str, args)], **kw)


def main_py(*args, **kw) -> subprocess.CompletedProcess:
    """`python main.py ARGS...`"""
    return run([sys.executable, os.path.join(ROOT, "main.py"), *map(str, args)], **kw)


# Python's warning format: "FILE:LINE: CATEGORY: message", then the source line, indented.
_WARNING = re.compile(r"^\S.*:\d+: [A-Za-z]*Warning: ")
# torch's own log warnings (glog style), e.g. the CUDA build without a GPU on importing
# torch.utils.cpp_extension: "W1202 05:29:37.415000 23468 torch/utils/cpp_extension.py:183] No CUDA
# runtime is found, using CUDA_HOME='/usr/local'"
_TORCH_LOG_WARNING = re.compile(r"^W\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    """stderr's lines without blank lines, progress bars and warnings that are not ours
    (torch's CUDA build may warn on machines without a GPU: "/.../torch/cuda/__init__.py:NNN:
    UserWarning: CUDA initialization: ..." and its source line, or a log line, see above)."""
    out, after_warning = [], False
    for ln in r.stderr.splitlines():
        s = ln.strip()
        if after_warning and ln[:1].isspace():  # the source line Python prints under a warning
            after_warning = False
            continue
        after_warning = bool(_WARNING.match(ln))
        if (not s or after_warning or _TORCH_LOG_WARNING.match(s) or "Warning" in s.split(":")[0]
                or s.startswith("warnings.warn")):
            continue
        out.append(s)
    return out


def assert_cli_error(r: subprocess.CompletedProcess, *needles: str, max_lines: int = 5, code: int | None = 2):
    """Non-zero exit (`code` when given), at most `max_lines` lines on stderr, no traceback, and
    an error line that contains every needle (case-insensitive)."""
    assert r.returncode != 0, f"exit 0, expected an error\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}"
    if code is not None:
        assert r.returncode == code, f"exit {r.returncode}, expected {code}\nstderr: {r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) <= max_lines, f"{len(lines)} lines on stderr:\n{r.stderr[-4000:]}"
    errors = [ln for ln in error_lines(r) if "error" in ln.lower()]
    assert errors, f"no error line on stderr:\n{r.stderr[-3000:]}"
    low = [e.lower() for e in errors]
    for n in needles:
        assert any(n.lower() in e for e in low), f"{n!r} not in the error line(s):\n" + "\n".join(errors)
