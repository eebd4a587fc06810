"""Batch jobs: streaming JSONL, error records, resume, OOM splitting, torchrun shards (kill -9 and
hostile inputs: test_hostile_batch.py)."""
import json
import os
import subprocess
import sys

import torch
from conftest import make_image

from vtprune.batch import answer_requests, run_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_requests(tmp_path, n=12, extras=True):
    for i in range(3):
        make_image(40 + i, 90, 90).save(tmp_path / f"im{i}.png")
    (tmp_path / "bad.png").write_text("not an image")
    lines = [json.dumps({"id": f"q{i}", "image": str(tmp_path / f"im{i % 3}.png"),
                         "question": "What is it?" + " really" * (i % 5)}) for i in range(n)]
    if extras:
        lines[2:2] = ["{broken json"]
        lines[4:4] = [json.dumps({"id": "q1", "image": str(tmp_path / "im0.png"), "question": "again"})]
        lines[6:6] = [json.dumps({"id": "img", "image": str(tmp_path / "bad.png"), "question": "?"})]
        lines[7:7] = [json.dumps({"id": "noq", "image": str(tmp_path / "im0.png")})]
        lines[8:8] = [json.dumps({"image": str(tmp_path / "im0.png"), "question": "no id"})]
        lines[9:9] = [json.dumps({"id": "missing", "image": str(tmp_path / "nope.png"), "question": "?"})]
    path = tmp_path / "req.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def read(path):
    return [json.loads(line) for line in open(path)]


def test_job_answers_each_id_once_and_reports_bad_records(small_engine, tmp_path):
    req = write_requests(tmp_path)
    out = tmp_path / "out.jsonl"
    counts = run_job(small_engine, str(req), str(out), batch_size=4, max_new_tokens=4, progress=False)
    recs = read(out)
    answers = [r for r in recs if "error" not in r]
    assert sorted(r["id"] for r in answers) == sorted(f"q{i}" for i in range(12))
    errors = {r["line"]: r for r in recs if "error" in r}
    assert errors[3]["error"].startswith("bad JSON")
    assert errors[5]["duplicate"] and errors[5]["id"] == "q1"
    assert "not an image" in errors[7]["error"] and errors[7]["id"] == "img"
    assert "missing field 'prompt' or 'question'" in errors[8]["error"]
    assert "missing field 'id'" in errors[9]["error"]
    assert errors[10]["error"] == f"image {tmp_path / 'nope.png'}: not found"
    assert counts["answered"] == 12 and counts["errors"] == 6
    # answers equal one-by-one generation
    q3 = next(r for r in answers if r["id"] == "q3")
    alone = small_engine.generate([str(tmp_path / "im0.png")],
                                  ["USER: <image>\nWhat is it? really really really ASSISTANT:"], max_new_tokens=4)[0]
    assert q3["token_ids"] == alone.token_ids
    # a re-run has nothing left to do
    again = run_job(small_engine, str(req), str(out), batch_size=4, max_new_tokens=4, progress=False)
    assert again["answered"] == 0 and again["errors"] == 0 and len(read(out)) == len(recs)


def test_torn_last_line_is_cut_and_the_job_resumes(small_engine, tmp_path):
    req = write_requests(tmp_path, n=6, extras=False)
    out = tmp_path / "out.jsonl"
    run_job(small_engine, str(req), str(out), batch_size=2, max_new_tokens=3, progress=False)
    lines = open(out).read().splitlines(keepends=True)
    with open(out, "w") as f:  # as if killed after two answers and halfway through the third line
        f.writelines(lines[:2])
        f.write(lines[2][: len(lines[2]) // 2])
    run_job(small_engine, str(req), str(out), batch_size=2, max_new_tokens=3, progress=False)
    ids = [r["id"] for r in read(out)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(6))


def test_out_of_memory_splits_the_batch(small_engine, monkeypatch):
    real = small_engine.generate
    calls = []

    def generate(images, prompts, **kw):
        calls.append(len(prompts))
        if len(prompts) > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(images, prompts, **kw)
    monkeypatch.setattr(small_engine, "generate", generate)
    reqs = [{"id": i, "image": make_image(i, 60, 60), "question": "Hi?"} for i in range(5)]
    out = list(answer_requests(small_engine, reqs, batch_size=4, max_new_tokens=2, scheduler="static"))
    assert sorted(r["id"] for r in out if "error" not in r) == list(range(5))
    assert calls[0] == 4 and calls.count(1) == 5


def test_a_failing_inflight_scheduler_hands_its_requests_to_the_static_path(small_engine, monkeypatch):
    """Out of memory in the in-flight prefill: the requests it held go through the static path
    (which splits on OOM); the scheduler goes on with the rest; every answer is the one it gets
    without the failure."""
    from vtprune.engine.scheduler import InflightScheduler

    reqs = [{"id": i, "image": make_image(i, 60, 60), "question": "Hi?" + " yes" * i} for i in range(7)]
    want = {r["id"]: r["token_ids"] for r in answer_requests(small_engine, reqs, batch_size=2, max_new_tokens=5)}
    real, calls = InflightScheduler._admit, []

    def admit(self, group, rows):
        calls.append(len(group))
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(self, group, rows)
    monkeypatch.setattr(InflightScheduler, "_admit", admit)
    got = {r["id"]: r["token_ids"] for r in answer_requests(small_engine, reqs, batch_size=2, max_new_tokens=5,
                                                            window=1)}
    assert got == want and len(want) == 7
    assert len(calls) > 2  # after the failure the scheduler admitted again


def test_python_api_yields_records(small_engine):
    reqs = [{"id": "a", "image": make_image(1, 60, 60), "prompt": "USER: <image>\nHi? ASSISTANT:"},
            {"id": "b", "image": make_image(2, 60, 60), "question": "Hello?"},
            {"id": "c", "image": make_image(3, 60, 60), "prompt": "no placeholder"}]
    out = {r["id"]: r for r in answer_requests(small_engine, reqs, batch_size=8, max_new_tokens=3)}
    assert len(out["a"]["token_ids"]) == 3 and len(out["b"]["token_ids"]) == 3
    assert "no '<image>' placeholder" in out["c"]["error"]
    static = {r["id"]: r for r in answer_requests(small_engine, reqs, batch_size=8, max_new_tokens=3,
                                                  scheduler="static")}
    assert {k: (r.get("token_ids"), r.get("text"), r.get("error")) for k, r in out.items()} == \
        {k: (r.get("token_ids"), r.get("text"), r.get("error")) for k, r in static.items()}


def free_port() -> int:
    """A port nobody listens on now (a fixed one collides with a concurrent run of this test)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_a_single_process(small_dir, tmp_path):
    req = write_requests(tmp_path, n=10)
    single, multi = tmp_path / "single.jsonl", tmp_path / "multi.jsonl"
    base = ["--model", small_dir, "--input", str(req), "--batch-size", "3", "--max-new-tokens", "4", "--no-progress"]
    r = subprocess.run([sys.executable, "-m", "vtprune", "batch", *base, "--output", str(single)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(free_port()), "-m", "vtprune", "batch", *base, "--output", str(multi)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    key = lambda rec: (str(rec.get("id")), rec.get("line") or 0)  # noqa: E731
    a = sorted(({k: v for k, v in rec.items() if k != "stats"} for rec in read(single)), key=key)
    b = sorted(({k: v for k, v in rec.items() if k != "stats"} for rec in read(multi)), key=key)
    assert a == b
    assert os.path.exists(f"{multi}.part0-of-2") and os.path.exists(f"{multi}.part1-of-2")
