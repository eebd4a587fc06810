"""Hostile paths and data for `vtprune generate / eval / train` and `main.py`: every problem is one
line on stderr naming the path and the reason, exit status 2, no traceback, no hang.

Each case runs in its own process. Importing torch costs 3-5 s per process, so the cases are
forked from one server process that imported vtprune once (`_ForkServer`): each child has its own
stdout, stderr and exit status, runs `vtprune.cli.main` (as `python -m vtprune`) or main.py (as
`python main.py`), and a traceback there is printed as Python prints it. The server runs without
the capabilities that bypass file permissions (hostile.NO_DAC, when root), so that chmod 000
files really are unreadable. Two cases also run as plain subprocesses, to check that the fork
server reports what a fresh process does.
"""
import json
import os
import select
import stat
import subprocess
import sys
import tempfile

import pytest
from conftest import make_image
from hostile import NO_DAC, ROOT, assert_cli_error, cli, error_lines, main_py

_SERVER = r'''
import json, os, runpy, sys, time, traceback
import vtprune, vtprune.cli, vtprune.quality.evaluate, vtprune.training  # the slow imports, once
MAIN_PY = os.path.join(sys.argv[1], "main.py")
replies = os.fdopen(os.dup(1), "w")  # fd 1 becomes each child's stdout
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, path in ((1, req["out"]), (2, req["err"])):
                f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(f, fd)
                os.close(f)
            os.chdir(req["cwd"])
            try:
                if req["argv"][0] == "main.py":  # python main.py ARGS
                    sys.argv = [MAIN_PY] + req["argv"][1:]
                    runpy.run_path(MAIN_PY, run_name="__main__")
                    code = 0
                else:  # python -m vtprune ARGS: vtprune/__main__.py is sys.exit(main())
                    sys.argv = ["vtprune"] + req["argv"][1:]
                    code = vtprune.cli.main(req["argv"][1:])
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) else 1)
    deadline, timed_out = time.monotonic() + req["timeout"], False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            _, status = os.waitpid(pid, 0)
            timed_out = True
            break
        time.sleep(0.01)
    replies.write(json.dumps({"rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out}) + "\n")
    replies.flush()
'''


class _ForkServer:
    def __init__(self, unprivileged: bool):
        self.dir = tempfile.mkdtemp(prefix="vtprune-forkcli-")
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("TRITON_INTERPRET", "1")
        argv = [sys.executable, "-c", _SERVER, ROOT]
        self.unprivileged = unprivileged and (os.geteuid() != 0 or NO_DAC is not None)
        if self.unprivileged and os.geteuid() == 0:
            argv = NO_DAC + argv
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, cwd=ROOT, env=env)
        self.n = 0

    def run(self, *args, timeout: float = 120, cwd: str = ROOT) -> subprocess.CompletedProcess:
        """args: ("vtprune", ...) or ("main.py", ...)."""
        self.n += 1
        out, err = (os.path.join(self.dir, f"{self.n}.{k}") for k in ("out", "err"))
        argv = [str(a) for a in args]
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": cwd, "timeout": timeout, "out": out,
                                          "err": err}) + "\n")
        self.proc.stdin.flush()
        # the first reply also waits for the server's imports (a first JIT build of the ops: ~1 min)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 600)
        assert ready, f"no reply from the fork server:\n{open(self.log.name).read()[-3000:]}"
        reply = self.proc.stdout.readline()
        assert reply, f"fork server died:\n{open(self.log.name).read()[-3000:]}"
        reply = json.loads(reply)
        assert not reply["timed_out"], f"{argv} still running after {timeout} s (a hang)"
        with open(out) as f_out, open(err) as f_err:
            return subprocess.CompletedProcess(argv, reply["rc"], f_out.read(), f_err.read())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def server():
    s = _ForkServer(unprivileged=True)
    yield s
    s.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_dir):
    """Hostile files, and the placeholders the cases use."""
    d = tmp_path_factory.mktemp("hostile_cli")
    make_image(0, 40, 40).save(d / "a.png")
    (d / "file.txt").write_text("a regular file\n")
    (d / "dir").mkdir()
    os.mkfifo(d / "fifo")
    os.symlink(d / "loop", d / "loop")  # a symlink to itself: ELOOP
    (d / "locked").write_text("policy: fastv\n")
    (d / "locked").chmod(0)
    (d / "locked_dir").mkdir()
    (d / "locked_dir").chmod(0)
    (d / "readonly_dir").mkdir()
    (d / "readonly_dir").chmod(stat.S_IRUSR | stat.S_IXUSR)
    (d / "latin1.yaml").write_bytes(b"policy: fastv\n# caf\xe9\n")
    (d / "bad.yaml").write_text("policy: [fastv\n")
    (d / "cfg.yaml").write_text("policy: fastv\nbudget: 20\n")
    good = json.dumps({"image": "a.png", "question": "What is it?", "answer": "a square", "id": 1})
    (d / "bad.jsonl").write_bytes(b'{"image": "a.png", "question": "caf\xe9?", "answer": "x"}\n'  # not UTF-8
                                  b"[1, 2]\n"                                                      # not an object
                                  b'{"image": "a.png", "question": "Q"}\n'                         # no answer
                                  b'{"image": "a.png", "question": 7, "answer": "x"}\n'            # wrong type
                                  b"{oops\n")                                                      # not JSON
    (d / "mixed.jsonl").write_bytes(good.encode() + b"\n" + (d / "bad.jsonl").read_bytes()
                                    + json.dumps({"image": "a.png", "question": "Q2", "answer": "b",
                                                  "id": "x"}).encode() + b"\n")
    (d / "mixed.json").write_bytes((d / "mixed.jsonl").read_bytes())
    (d / "two_stage.yaml").write_text("policy: two_stage\n")
    run = d / "run"
    run.mkdir()
    (run / "pruning.yaml").write_text("policy: two_stage\n")
    values = {"tmp": str(d), "model": small_dir, "img": str(d / "a.png")}
    yield values
    for p in ("locked", "locked_dir", "readonly_dir"):
        (d / p).chmod(0o700)


# (id, argv (placeholders filled from `env`), the error line's needles, needs a permission check)
G = ["vtprune", "generate", "--model", "{model}", "--prompt", "What is it?"]
E = ["vtprune", "eval", "--model", "{model}", "--no-progress"]
T = ["vtprune", "train", "--model", "{model}", "--no-progress"]
M = ["main.py"]
FIFO = "is a FIFO (named pipe), not a regular file"
LOOP = "too many levels of symbolic links (a symlink loop)"
CASES = [
    # generate: the model directory, the image, the pruning YAML, the sampling arguments
    ("gen-model-missing", G + ["--image", "{img}"], ["model directory {tmp}/nope: not found"], False,
     {"model": "{tmp}/nope"}),
    ("gen-model-is-file", G + ["--image", "{img}"], ["model directory {tmp}/file.txt: is not a directory"], False,
     {"model": "{tmp}/file.txt"}),
    ("gen-model-loop", G + ["--image", "{img}"], [f"model directory {{tmp}}/loop: {LOOP}"], False,
     {"model": "{tmp}/loop"}),
    ("gen-model-locked", G + ["--image", "{img}"], ["model directory {tmp}/locked_dir: permission denied"], True,
     {"model": "{tmp}/locked_dir"}),
    ("gen-image-missing", G + ["--image", "{tmp}/none.png"], ["image {tmp}/none.png: not found"], False, {}),
    ("gen-image-dir", G + ["--image", "{tmp}/dir"], ["image {tmp}/dir: is a directory"], False, {}),
    ("gen-image-fifo", G + ["--image", "{tmp}/fifo"], [f"image {{tmp}}/fifo: {FIFO}"], False, {}),
    ("gen-image-loop", G + ["--image", "{tmp}/loop"], [f"image {{tmp}}/loop: {LOOP}"], False, {}),
    ("gen-image-locked", G + ["--image", "{tmp}/locked"], ["image {tmp}/locked: permission denied"], True, {}),
    ("gen-image-under-file", G + ["--image", "{tmp}/file.txt/a.png"],
     ["image {tmp}/file.txt/a.png: a parent of it is not a directory"], False, {}),
    ("gen-pruning-latin1", G + ["--image", "{img}", "--pruning", "{tmp}/latin1.yaml"],
     ["pruning config {tmp}/latin1.yaml: not UTF-8 text (byte 0xe9 on line 2)"], False, {}),
    ("gen-pruning-bad-yaml", G + ["--image", "{img}", "--pruning", "{tmp}/bad.yaml"],
     ["pruning config {tmp}/bad.yaml: not valid YAML"], False, {}),
    ("gen-pruning-dir", G + ["--image", "{img}", "--pruning", "{tmp}/dir"],
     ["pruning config {tmp}/dir: is a directory"], False, {}),
    ("gen-pruning-fifo", G + ["--image", "{img}", "--pruning", "{tmp}/fifo"],
     [f"pruning config {{tmp}}/fifo: {FIFO}"], False, {}),
    ("gen-pruning-locked", G + ["--image", "{img}", "--pruning", "{tmp}/locked"],
     ["pruning config {tmp}/locked: permission denied"], True, {}),
    ("gen-temperature-nan", G + ["--image", "{img}", "--temperature", "nan"],
     ["vtprune: error: temperature must be a finite number, got nan"], False, {}),
    ("gen-seed-65-bits", G + ["--image", "{img}", "--temperature", "1", "--seed", str(2**64)],
     [f"vtprune: error: seed must be an integer in [0, 2**64), got {2**64}"], False, {}),
    ("gen-stop-empty", G + ["--image", "{img}", "--stop", ""], ["vtprune: error: stop[0] is an empty string"], False,
     {}),
    ("gen-argparse-bad-int", G + ["--image", "{img}", "--max-new-tokens", "many"],
     ["vtprune generate: error: argument --max-new-tokens: invalid int value: 'many'"], False, {}),
    # eval: the data file, its records, the outputs
    ("eval-data-missing", E + ["--data", "{tmp}/none.jsonl"], ["eval data {tmp}/none.jsonl: not found"], False, {}),
    ("eval-data-dir", E + ["--data", "{tmp}/dir"], ["eval data {tmp}/dir: is a directory"], False, {}),
    ("eval-data-fifo", E + ["--data", "{tmp}/fifo"], [f"eval data {{tmp}}/fifo: {FIFO}"], False, {}),
    ("eval-data-loop", E + ["--data", "{tmp}/loop"], [f"eval data {{tmp}}/loop: {LOOP}"], False, {}),
    ("eval-data-locked", E + ["--data", "{tmp}/locked"], ["eval data {tmp}/locked: permission denied"], True, {}),
    ("eval-data-no-usable-record", E + ["--data", "{tmp}/bad.jsonl"],
     ["eval data {tmp}/bad.jsonl: no usable records (5 lines skipped; line 1: not UTF-8 text (byte 0xe9 at "
      "column 36))"], False, {}),
    ("eval-data-not-text", E + ["--data", "{img}"], ["eval data {img}: no usable records", "not UTF-8 text"], False,
     {}),
    ("eval-out-under-file", E + ["--data", "{tmp}/mixed.jsonl", "--out", "{tmp}/file.txt/results"],
     ["--out file {tmp}/file.txt/results.json: {tmp}/file.txt is not a directory"], False, {}),
    ("eval-out-deep-under-file", E + ["--data", "{tmp}/mixed.jsonl", "--out", "{tmp}/file.txt/a/b/results"],
     ["--out file {tmp}/file.txt/a/b/results.json: {tmp}/file.txt is not a directory"], False, {}),
    ("eval-out-is-dir", E + ["--data", "{tmp}/mixed.jsonl", "--out", "{tmp}/dir"],
     ["--out {tmp}/dir: is a directory; give a path stem"], False, {}),
    ("eval-out-unwritable", E + ["--data", "{tmp}/mixed.jsonl", "--out", "{tmp}/readonly_dir/results"],
     ["--out file {tmp}/readonly_dir/results.json: directory {tmp}/readonly_dir: permission denied"], True, {}),
    ("eval-out-is-data", E + ["--data", "{tmp}/mixed.json", "--out", "{tmp}/mixed"],
     ["--out file {tmp}/mixed.json is the --data file ({tmp}/mixed.json): refusing to overwrite it"], False, {}),
    ("eval-predictions-is-data", E + ["--data", "{tmp}/mixed.jsonl", "--predictions", "{tmp}/mixed.jsonl"],
     ["--predictions file {tmp}/mixed.jsonl is the --data file ({tmp}/mixed.jsonl): refusing to overwrite it"],
     False, {}),
    ("eval-predictions-fifo", E + ["--data", "{tmp}/mixed.jsonl", "--predictions", "{tmp}/fifo"],
     [f"--predictions file {{tmp}}/fifo: {FIFO}"], False, {}),
    ("eval-predictions-locked", E + ["--data", "{tmp}/mixed.jsonl", "--predictions", "{tmp}/locked"],
     ["--predictions file {tmp}/locked: permission denied"], True, {}),
    ("eval-pruning-latin1", E + ["--data", "{tmp}/mixed.jsonl", "--pruning", "{tmp}/latin1.yaml"],
     ["pruning config {tmp}/latin1.yaml: not UTF-8 text (byte 0xe9 on line 2)"], False, {}),
    ("eval-batch-size-0", E + ["--data", "{tmp}/mixed.jsonl", "--batch-size", "0"],
     ["vtprune: error: --batch-size must be >= 1, got 0"], False, {}),
    # train: the config, the data, the run directory
    ("train-config-missing", T + ["--config", "{tmp}/none.yaml", "--data", "{tmp}/mixed.jsonl", "--out", "{tmp}/r1"],
     ["pruning config {tmp}/none.yaml: not found"], False, {}),
    ("train-config-latin1", T + ["--config", "{tmp}/latin1.yaml", "--data", "{tmp}/mixed.jsonl", "--out", "{tmp}/r1"],
     ["pruning config {tmp}/latin1.yaml: not UTF-8 text (byte 0xe9 on line 2)"], False, {}),
    ("train-data-fifo", T + ["--config", "{tmp}/two_stage.yaml", "--data", "{tmp}/fifo", "--out", "{tmp}/r1"],
     [f"training data {{tmp}}/fifo: {FIFO}"], False, {}),
    ("train-data-locked", T + ["--config", "{tmp}/two_stage.yaml", "--data", "{tmp}/locked", "--out", "{tmp}/r1"],
     ["training data {tmp}/locked: permission denied"], True, {}),
    ("train-out-is-file", T + ["--config", "{tmp}/two_stage.yaml", "--data", "{tmp}/mixed.jsonl", "--out", "{tmp}/file.txt"],
     ["--out directory {tmp}/file.txt: exists and is not a directory"], False, {}),
    ("train-out-under-file", T + ["--config", "{tmp}/two_stage.yaml", "--data", "{tmp}/mixed.jsonl",
                                  "--out", "{tmp}/file.txt/run"],
     ["--out directory {tmp}/file.txt/run: {tmp}/file.txt is not a directory"], False, {}),
    ("train-out-unwritable", T + ["--config", "{tmp}/two_stage.yaml", "--data", "{tmp}/mixed.jsonl",
                                  "--out", "{tmp}/readonly_dir/run"],
     ["--out directory {tmp}/readonly_dir/run: directory {tmp}/readonly_dir: permission denied"], True, {}),
    ("train-config-is-output", T + ["--config", "{tmp}/run/pruning.yaml", "--data", "{tmp}/mixed.jsonl",
                                    "--out", "{tmp}/run"],
     ["--out file {tmp}/run/pruning.yaml is the --config file ({tmp}/run/pruning.yaml): refusing to overwrite it"],
     False, {}),
    ("train-epochs-nan", T + ["--config", "{tmp}/two_stage.yaml", "--data", "{tmp}/mixed.jsonl", "--out", "{tmp}/r1",
                              "--epochs", "nan"], ["vtprune: error: --epochs must be a finite number > 0, got nan"],
     False, {}),
    # main.py
    ("main-model-is-file", M + ["--model", "{tmp}/file.txt"],
     ["main.py: error: model directory {tmp}/file.txt: is not a directory"], False, {}),
    ("main-pruning-dir", M + ["--pruning", "{tmp}/dir"], ["main.py: error: pruning config {tmp}/dir: is a directory"],
     False, {}),
    ("main-pruning-bad-yaml", M + ["--pruning", "{tmp}/bad.yaml"],
     ["main.py: error: pruning config {tmp}/bad.yaml: not valid YAML"], False, {}),
    ("main-pruning-locked", M + ["--pruning", "{tmp}/locked"],
     ["main.py: error: pruning config {tmp}/locked: permission denied"], True, {}),
    ("main-max-new-tokens-0", M + ["--max-new-tokens", "0"],
     ["main.py: error: max_new_tokens must be an integer >= 1, got 0"], False, {}),
    ("main-device-tpu", M + ["--device", "tpu"], ["main.py: error: unsupported device 'tpu'"], False, {}),
]


def _fill(items, values):
    return [str(i).format(**values) for i in items]


@pytest.mark.parametrize("argv,needles,needs_permissions,override", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(server, env, argv, needles, needs_permissions, override):
    if needs_permissions and not server.unprivileged:
        pytest.skip("permission errors cannot be provoked here (root without setpriv)")
    values = dict(env, **{k: v.format(**env) for k, v in override.items()})
    r = server.run(*_fill(argv, values), timeout=60)
    assert_cli_error(r, *_fill(needles, values))
    assert r.stdout == ""


def test_eval_skips_bad_records_with_one_warning_line_each(server, env, tmp_path):
    """A bad *record* is skipped and reported (PATH:LINE: skipped: REASON, the first five, then a
    count), the good ones are evaluated; missing output directories are created."""
    t = env["tmp"]
    preds, out = tmp_path / "new" / "preds.jsonl", tmp_path / "deeper" / "results"
    r = server.run("vtprune", "eval", "--model", env["model"], "--data", f"{t}/mixed.jsonl", "--max-new-tokens", 2,
                   "--no-progress", "--predictions", preds, "--out", out)
    assert r.returncode == 0, r.stderr
    data = f"{t}/mixed.jsonl"
    assert error_lines(r) == [
        f"vtprune: warning: {data}:2: skipped: not UTF-8 text (byte 0xe9 at column 36)",
        f"vtprune: warning: {data}:3: skipped: expected a JSON object, got an array",
        f"vtprune: warning: {data}:4: skipped: 'answer' is missing",
        f"vtprune: warning: {data}:5: skipped: 'question' must be a string, got a number (7)",
        f"vtprune: warning: {data}:6: skipped: not valid JSON (Expecting property name enclosed in double quotes "
        f"at column 2)",
    ]
    rows = [json.loads(ln) for ln in preds.read_text().splitlines()]
    assert [(row["id"], row["line"], row["question"]) for row in rows] == [("1", 1, "What is it?"), ("x", 7, "Q2")]
    assert json.loads((tmp_path / "deeper" / "results.json").read_text())["meta"]["n_records"] == 2
    assert (tmp_path / "deeper" / "results.md").read_text().startswith("Evaluation of ")


def test_train_refuses_data_without_usable_records(server, env):
    t = env["tmp"]
    r = server.run("vtprune", "train", "--model", env["model"], "--config", f"{t}/two_stage.yaml", "--data",
                   f"{t}/bad.jsonl", "--out", f"{t}/r2", "--no-progress", timeout=120)
    # the config is checked against the model later: the data is refused first, before the model loads
    assert_cli_error(r, f"training data {t}/bad.jsonl: no usable records (5 lines skipped; line 1: not UTF-8 text")
    assert not os.path.exists(f"{t}/r2")  # nothing created


def test_fork_server_reports_what_a_fresh_process_does(server, env):
    """The same two cases as plain subprocesses: the same exit status and error lines."""
    t = env["tmp"]
    cases = [("vtprune", ["generate", "--model", env["model"], "--image", f"{t}/fifo", "--prompt", "q"], cli),
             ("main.py", ["--pruning", f"{t}/locked"], main_py)]
    for prog, args, fresh in cases:
        forked = server.run(prog, *args)
        plain = fresh(*args, unprivileged=True, timeout=120)
        assert (plain.returncode, error_lines(plain)) == (forked.returncode, error_lines(forked)), plain.stderr
        assert plain.returncode == 2 and "Traceback" not in plain.stderr
