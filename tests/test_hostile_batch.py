"""Hostile batch jobs (issue 16): a bad request becomes an error record and the job goes on, a bad
job setting is refused at start-up before anything is written, nothing blocks, the input is never
touched, nothing already done is lost, and a job killed at any point (or crashing on one request)
finishes on re-runs with every id answered exactly once."""
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
from conftest import make_image
from hostile import ROOT, assert_cli_error, can_drop_privileges, cli, run

from vtprune.batch import answer_requests, check_context, check_world, merge_parts, open_job, read_results, run_job
from vtprune.errors import VtpruneError

Q = "USER: <image>\n{} ASSISTANT:"


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def write_lines(path, lines):
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


def job(engine, tmp_path, lines, **kw):
    req = write_lines(tmp_path / "req.jsonl", lines)
    out = tmp_path / "out.jsonl"
    counts = run_job(engine, str(req), str(out), progress=False, **{"batch_size": 4, "max_new_tokens": 3, **kw})
    return read(out), counts


def strip_stats(recs):
    return [{k: v for k, v in r.items() if k != "stats"} for r in recs]


def bomb_png(path, w=30000, h=30000):
    """A valid 8-bit greyscale PNG header declaring w x h pixels (900 M: PIL's bomb limit is 179 M)
    with one row of data: small on disk, refused before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1)))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for i in range(3):
        make_image(70 + i, 60, 60).save(d / f"im{i}.png")
    os.mkfifo(d / "fifo")
    os.symlink(d / "loop", d / "loop")
    (d / "corrupt.png").write_bytes(b"not an image at all")
    (d / "subdir").mkdir()
    bomb_png(d / "bomb.png")
    return d


@pytest.fixture
def no_hang():
    """Fail instead of blocking forever (a FIFO opened for reading waits for a writer)."""
    def fail(*_):
        raise TimeoutError("the job blocked")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def rec(**fields):
    return json.dumps(fields)


# ----------------------------------------------------------------------------- bad requests
# name: (input line, the id and error of the record it must become). DIR is the images folder. Each
# job reads a good request, then that line.
ID = "field 'id' must be a string or an integer, got "
PH = "exactly one is required (or give a 'question')"
RECORD_CASES = {
    "id-bool": (rec(id=True, image="x", question="q"), None, ID + "a boolean"),
    "id-float": (rec(id=1.5, image="x", question="q"), None, ID + "a float (1.5)"),
    "id-nan": ('{"id": NaN, "image": "x", "question": "q"}', None,
               ID + "a float (NaN)"),
    "id-list": (rec(id=[1], image="x", question="q"), None, ID + "a list"),
    "id-object": (rec(id={"a": 1}, image="x", question="q"), None,
                  ID + "an object"),
    "id-out-of-64-bits": (rec(id=2**63, image="x", question="q"), None,
                          "field 'id' is an integer out of range: integer ids must fit in 64 bits "
                          "(give it as a string)"),
    "id-5000-digits": ('{"id": ' + "9" * 5000 + "}", None, "bad JSON: an integer of more than 4300 digits"),
    "id-empty": (rec(id="", image="x", question="q"), None, "field 'id' is an empty string"),
    "id-surrogate": ('{"id": "\\ud800", "image": "x", "question": "q"}', None,
                     "field 'id' is not valid Unicode (it holds an unpaired surrogate escape)"),
    "id-missing": (rec(image="x", question="q"), None, "missing field 'id'"),
    "not-object-42": ("42", None, "expected a JSON object, got an integer"),
    "not-object-list": ("[1]", None, "expected a JSON object, got a list"),
    "not-object-null": ("null", None, "expected a JSON object, got null"),
    "bad-json": ("{broken", None, "bad JSON: Expecting property name enclosed in double quotes (column 2)"),
    "not-utf8": (b'{"id": "caf\xe9", "image": "x", "question": "q"}', None,
                 "line is not UTF-8 text (byte 0xe9 at column 12)"),
    "line-over-1-MiB": ('{"id": "long", "image": "x", "question": "' + "a" * (1 << 20) + '"}', None,
                        "line is longer than 1048576 bytes; a request is one short JSON line"),
    "image-int": (rec(id="i", image=5, question="q"), "i",
                  "field 'image' must be a string (a file path), got an integer"),
    "image-list": (rec(id="i", image=["a.png"], question="q"), "i",
                   "field 'image' must be a string (a file path), got a list"),
    "image-empty": (rec(id="i", image="", question="q"), "i", "field 'image' is an empty string"),
    "image-field-missing": (rec(id="i", question="q"), "i", "missing field 'image'"),
    "prompt-no-placeholder": (rec(id="p", image="DIR/im0.png", prompt="hi"), "p",
                              "field 'prompt' has no '<image>' placeholder; " + PH),
    "prompt-two-placeholders": (rec(id="p", image="DIR/im0.png", prompt="<image> and <image>"), "p",
                                "field 'prompt' has 2 '<image>' placeholders; " + PH),
    "prompt-not-string": (rec(id="p", image="DIR/im0.png", prompt=["<image>"]), "p",
                          "field 'prompt' must be a string, got a list"),
    "prompt-and-question": (rec(id="p", image="DIR/im0.png", prompt="<image>", question="q"), "p",
                            "fields 'prompt' and 'question' are both given; give one"),
    "question-with-placeholder": (rec(id="p", image="DIR/im0.png", question="<image> what?"), "p",
                                  "field 'question' contains '<image>'; give a full 'prompt' instead"),
    "question-blank": (rec(id="p", image="DIR/im0.png", question="  "), "p", "field 'question' is empty"),
    "no-prompt": (rec(id="p", image="DIR/im0.png"), "p", "missing field 'prompt' or 'question'"),
    "prompt-huge": (rec(id="p", image="DIR/im0.png", question="word " * 5000), "p",
                    "prompt is 5047 tokens (36 of them visual): its text alone does not fit in the model's "
                    "context of 2048"),
    "image-missing": (rec(id="m", image="DIR/nope.png", question="q"), "m", "image DIR/nope.png: not found"),
    "image-directory": (rec(id="m", image="DIR/subdir", question="q"), "m", "image DIR/subdir: is a directory"),
    "image-fifo": (rec(id="m", image="DIR/fifo", question="q"), "m",
                   "image DIR/fifo: is a FIFO (named pipe), not a regular file; refused (it could block forever)"),
    "image-symlink-loop": (rec(id="m", image="DIR/loop", question="q"), "m",
                           "image DIR/loop: too many levels of symbolic links (a symlink loop)"),
    "image-corrupt": (rec(id="m", image="DIR/corrupt.png", question="q"), "m",
                      "image DIR/corrupt.png is not an image (PIL cannot identify it as one of PNG, JPEG, GIF, BMP, "
                      "DIB, TIFF, WEBP, AVIF, PPM, TGA, ICO, JPEG2000)"),
}


@pytest.mark.parametrize("case", list(RECORD_CASES))
def test_a_bad_request_becomes_one_final_error_record(small_engine, files, tmp_path, no_hang, case):
    line, rid, error = RECORD_CASES[case]
    line = line.replace("DIR", str(files)) if isinstance(line, str) else line
    recs, counts = job(small_engine, tmp_path, [rec(id="ok", image=str(files / "im0.png"), question="hi"), line])
    assert recs[0] == {"id": rid, "line": 2, "error": error.replace("DIR", str(files))}
    assert [r["id"] for r in recs[1:]] == ["ok"] and "text" in recs[1]
    assert counts["errors"] == 1 and counts["answered"] == 1
    # final: a re-run skips it (and the answer)
    again, counts = job(small_engine, tmp_path, [rec(id="ok", image=str(files / "im0.png"), question="hi"), line])
    assert again == recs and counts["answered"] == counts["errors"] == 0


def test_decompression_bomb_is_that_request_s_error_and_the_job_goes_on(small_engine, files, tmp_path):
    lines = [rec(id="bomb", image=str(files / "bomb.png"), question="q"),
             rec(id="ok", image=str(files / "im1.png"), question="q")]
    recs, _ = job(small_engine, tmp_path, lines)
    bomb = recs[0]
    assert bomb["id"] == "bomb" and bomb["line"] == 1 and set(bomb) == {"id", "line", "error"}
    assert bomb["error"].startswith(f"image {files / 'bomb.png'} has more pixels than the limit of 89478485 "
                                    "(refused as a possible decompression bomb; PIL: Image size (900000000 pixels)")
    assert recs[1]["id"] == "ok" and len(recs[1]["token_ids"]) == 3
    again, counts = job(small_engine, tmp_path, lines)  # the bomb is final: re-runs do not crash on it
    assert again == recs and counts["errors"] == 0


def test_any_exception_while_loading_an_image_is_a_record(small_engine, files, tmp_path, monkeypatch):
    import vtprune.engine.inputs as inputs

    real = inputs.load_image

    def load_image(image, index=0, processor=None):
        if str(image).endswith("im1.png"):
            raise struct.error("unpack requires a buffer of 4 bytes")
        if str(image).endswith("im2.png"):
            raise MemoryError()
        return real(image, index, processor)
    monkeypatch.setattr(inputs, "load_image", load_image)
    recs, counts = job(small_engine, tmp_path, [rec(id=i, image=str(files / f"im{i}.png"), question="q")
                                                for i in range(3)])
    by_id = {r["id"]: r for r in recs}
    assert by_id[1] == {"id": 1, "line": 2, "error": f"image {files / 'im1.png'}: cannot be loaded "
                                                     "(error: unpack requires a buffer of 4 bytes)"}
    assert by_id[2]["error"] == f"image {files / 'im2.png'}: out of memory while loading it (MemoryError)"
    assert by_id[2]["retry"] == "other settings" and len(by_id[2]["settings"]) == 12
    assert len(by_id[0]["token_ids"]) == 3 and counts["retry"] == 1


def test_ids_of_every_valid_kind_are_answered_and_kept_exactly(small_engine, files, tmp_path):
    ids = [0, -2**63, 2**63 - 1, "ü€ 𝄞", "0", " "]
    recs, _ = job(small_engine, tmp_path, [rec(id=i, image=str(files / "im0.png"), question="q") for i in ids])
    assert sorted(map(json.dumps, (r["id"] for r in recs))) == sorted(map(json.dumps, ids))
    assert all("text" in r for r in recs)


def test_duplicate_ids_are_answered_once_even_across_a_resume(small_engine, files, tmp_path):
    im = str(files / "im0.png")
    lines = [rec(id="a", image=im, question="q"), rec(id=1, image=im, question="r"),
             rec(id="a", image=im, question="again"), rec(id="1", image=im, question="a string id")]
    recs, _ = job(small_engine, tmp_path, lines)
    assert [r for r in recs if "error" in r] == [
        {"id": "a", "line": 3, "duplicate": True,
         "error": "duplicate id 'a': line 1 has it first (that line is answered, this one is not)"}]
    assert sorted(json.dumps(r["id"]) for r in recs if "text" in r) == ['"1"', '"a"', "1"]
    # a job killed after answering "a" but before its duplicate line: the re-run still reports it
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(next(r for r in recs if r["id"] == "a")) + "\n")
    again, _ = job(small_engine, tmp_path, lines)
    assert sorted(json.dumps(r["id"]) for r in again if "text" in r) == ['"1"', '"a"', "1"]
    assert [r for r in again if "error" in r] == [r for r in recs if "error" in r]


# ----------------------------------------------------------------------------- settings
def long_question(engine, tokens):
    """A question whose prompt is exactly `tokens` tokens long."""
    words = tokens - len(engine.prompts.encode(Q.format("")))
    while len(engine.prompts.encode(Q.format("a " * words))) > tokens:
        words -= 1
    assert len(engine.prompts.encode(Q.format("a " * words))) == tokens
    return "a " * words


def test_a_setting_error_is_retried_by_a_run_with_other_settings(small_engine, files, tmp_path):
    long_q = long_question(small_engine, 2040)  # context 2048: 8 new tokens fit, 10 do not
    im = str(files / "im0.png")
    lines = [rec(id="short", image=im, question="q"), rec(id="long", image=im, question=long_q)]
    recs, counts = job(small_engine, tmp_path, lines, max_new_tokens=10)
    err = next(r for r in recs if r["id"] == "long")
    assert err == {"id": "long", "line": 2, "retry": "other settings", "settings": err["settings"],
                   "error": "prompt is 2040 tokens (36 of them visual); with max_new_tokens 10 it exceeds the "
                            "model's context of 2048 (at most 8 new tokens fit)"}
    assert counts == {**counts, "answered": 1, "errors": 1, "retry": 1}
    again, counts = job(small_engine, tmp_path, lines, max_new_tokens=10)  # same settings: nothing to do
    assert again == recs and counts["answered"] == counts["errors"] == 0 and counts["skipped"] == 2
    final, counts = job(small_engine, tmp_path, lines, max_new_tokens=8)  # other settings: answered
    assert counts["answered"] == 1 and counts["errors"] == 0 and final[: len(recs)] == recs
    assert [r["id"] for r in final[len(recs):]] == ["long"] and len(final[-1]["token_ids"]) <= 8
    results = {r["id"]: r for r in read_results(str(tmp_path / "out.jsonl"))}
    assert set(results) == {"short", "long"} and "text" in results["long"] and "text" in results["short"]


@pytest.mark.parametrize("kw, message", [
    ({"max_new_tokens": 2012}, "--max-new-tokens 2012: too large for the model's context of 2048 tokens; the "
                               "shortest possible prompt ('<image>' alone) is 37 tokens (36 visual), so at most "
                               "2011 new tokens fit"),
    ({"batch_size": 0}, "--batch-size 0: the batch size must be an integer >= 1"),
    ({"batch_size": True}, "--batch-size True: the batch size must be an integer >= 1"),
    ({"max_new_tokens": 2.5}, "--max-new-tokens 2.5: the number of new tokens must be an integer >= 1"),
])
def test_a_bad_job_setting_is_refused_before_anything_is_written(small_engine, files, tmp_path, kw, message):
    req = write_lines(tmp_path / "req.jsonl", [rec(id=1, image=str(files / "im0.png"), question="q")])
    out = tmp_path / "out.jsonl"
    with pytest.raises(VtpruneError) as e:
        run_job(small_engine, str(req), str(out), progress=False, **{"batch_size": 2, "max_new_tokens": 2, **kw})
    assert str(e.value) == message
    assert sorted(os.listdir(tmp_path)) == ["req.jsonl"]


def test_max_new_tokens_at_the_limit_is_accepted(small_engine):
    check_context(small_engine, 2011)  # '<image>' alone (37 tokens) + 2011 = 2048: fits
    with pytest.raises(VtpruneError):
        check_context(small_engine, 2012)


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "environment variables RANK=2, WORLD_SIZE=2: need 0 <= RANK < WORLD_SIZE"),
    ({"WORLD_SIZE": "0"}, "environment variables RANK=0, WORLD_SIZE=0: need 0 <= RANK < WORLD_SIZE"),
])
def test_torchrun_environment_is_checked(env, message):
    with pytest.raises(VtpruneError) as e:
        check_world(env)
    assert str(e.value) == message


# ----------------------------------------------------------------------------- the output file
FOREIGN = {
    "number": (b"42\n", "line 1 is an integer, not a record"),
    "list": (b"[1]\n", "line 1 is a list, not a record"),
    "null": (b"null\n", "line 1 is null, not a record"),
    "text": (b"hello\nworld\n", "line 1 is not valid JSON"),
    "not-utf8": (b'{"id": "\xff"}\n', "line 1 is not UTF-8 text"),
    "other-object": (b'{"name": "x"}\n', "line 1 is a JSON object that is not a vtprune batch record"),
    "record-then-foreign": (b'{"id": 1, "text": "x", "token_ids": []}\n\n{"id": 2, "text": 3}\n',
                            "line 3 is a JSON object that is not a vtprune batch record"),
    "foreign-last-line-without-newline": (b'{"id": 1, "text": "x", "token_ids": []}\nnotes',
                                          "line 2 is not valid JSON"),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_an_output_that_is_not_a_vtprune_output_is_refused_and_left_alone(files, tmp_path, case):
    data, reason = FOREIGN[case]
    req = write_lines(tmp_path / "req.jsonl", [rec(id=1, image=str(files / "im0.png"), question="q")])
    out = tmp_path / "out.jsonl"
    out.write_bytes(data)
    with pytest.raises(VtpruneError) as e:
        open_job(str(req), str(out))
    assert str(e.value) == (f"output file {out} {reason}: it is not a vtprune batch output; refusing to append to it "
                            f"(give another --output)")
    assert out.read_bytes() == data and sorted(os.listdir(tmp_path)) == ["out.jsonl", "req.jsonl"]


def test_torn_record_is_cut_and_a_whole_last_record_kept(small_engine, tmp_path):
    lines = ["42", "{bad", "[]"]  # error records only: no generation needed
    out = tmp_path / "out.jsonl"
    recs, _ = job(small_engine, tmp_path, lines)
    whole = [json.dumps(r, ensure_ascii=False) for r in recs]
    out.write_text(whole[0] + "\n" + whole[1])  # the last record lost its newline only
    assert job(small_engine, tmp_path, lines)[0] == recs
    out.write_text(whole[0] + "\n" + whole[1][:9])  # killed mid-write: '{"id": nu'
    assert job(small_engine, tmp_path, lines)[0] == recs


@pytest.mark.parametrize("how", ["same-path", "relative-path", "symlink", "hard-link", "torchrun-part",
                                 "in-flight-file", "pruning-config"])
def test_an_output_that_is_an_input_is_refused_before_touching_anything(files, tmp_path, monkeypatch, how):
    req = write_lines(tmp_path / "req.jsonl", [rec(id=1, image=str(files / "im0.png"), question="q")] * 2)
    data = req.read_bytes()
    shard, inputs, out, what = (0, 1), None, str(req), "output file"
    if how == "relative-path":
        monkeypatch.chdir(tmp_path)
        out = "./sub/../req.jsonl"
        (tmp_path / "sub").mkdir()
    elif how == "symlink":
        out = str(tmp_path / "link.jsonl")
        os.symlink(req, out)
    elif how == "hard-link":
        out = str(tmp_path / "hard.jsonl")
        os.link(req, out)
    elif how == "torchrun-part":
        os.rename(req, tmp_path / "out.jsonl.part1-of-2")
        req, out, shard, what = tmp_path / "out.jsonl.part1-of-2", str(tmp_path / "out.jsonl"), (1, 2), "part file"
    elif how == "in-flight-file":
        os.rename(req, tmp_path / "out.jsonl.inflight")
        req, out, what = tmp_path / "out.jsonl.inflight", str(tmp_path / "out.jsonl"), "in-flight file"
    elif how == "pruning-config":
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("policy: fastv\n")
        inputs, out, data = {"pruning config": str(cfg)}, str(cfg), cfg.read_bytes()
    with pytest.raises(VtpruneError) as e:
        open_job(str(req), out, shard=shard, inputs=inputs)
    target = {"torchrun-part": str(req), "in-flight-file": str(req)}.get(how, out)
    name = "pruning config" if how == "pruning-config" else "input file"
    assert str(e.value).startswith(f"{what} {target} is the {name} (")
    assert str(e.value).endswith("): refusing to overwrite it")
    assert (tmp_path / ("cfg.yaml" if how == "pruning-config" else os.path.basename(req))).read_bytes() == data


def test_a_foreign_in_flight_file_is_refused(files, tmp_path):
    req = write_lines(tmp_path / "req.jsonl", [rec(id=1, image=str(files / "im0.png"), question="q")])
    (tmp_path / "out.jsonl.inflight").write_text("my notes\n")
    with pytest.raises(VtpruneError) as e:
        open_job(str(req), str(tmp_path / "out.jsonl"))
    assert str(e.value) == (f"in-flight file {tmp_path / 'out.jsonl.inflight'}: not written by vtprune batch; "
                            f"refusing to overwrite it (move it away if it is not needed)")
    assert (tmp_path / "out.jsonl.inflight").read_text() == "my notes\n"


def test_blank_input_is_refused(tmp_path):
    req = tmp_path / "req.jsonl"
    req.write_text("\ufeff\n  \n\n")
    with pytest.raises(VtpruneError) as e:
        open_job(str(req), str(tmp_path / "out.jsonl"))
    assert str(e.value) == f"input file {req}: holds no requests (only blank lines)"


def test_parts_and_earlier_outputs_are_never_lost(small_engine, files, tmp_path):
    """A single run, then a torchrun-style run on the same output, then a merge, then a single run
    that finds leftover parts: every id answered exactly once, earlier lines kept byte for byte."""
    req = write_lines(tmp_path / "req.jsonl", [rec(id=i, image=str(files / f"im{i % 3}.png"), question="q")
                                               for i in range(6)] + ["oops"])
    out = tmp_path / "out.jsonl"
    write_lines(tmp_path / "first.jsonl", [rec(id=i, image=str(files / f"im{i % 3}.png"), question="q")
                                           for i in range(2)])
    run_job(small_engine, str(tmp_path / "first.jsonl"), str(out), 4, 2, progress=False)
    before = out.read_bytes()
    for rank in range(2):  # ranks of a 2-process job: ids 0 and 1 are done already
        run_job(small_engine, str(req), str(out), 4, 2, shard=(rank, 2), progress=False)
    parts = [read(tmp_path / f"out.jsonl.part{r}-of-2") for r in range(2)]
    assert sorted(json.dumps(r["id"]) for p in parts for r in p) == ["2", "3", "4", "5", "null"]
    assert merge_parts(str(out)) == 5 and merge_parts(str(out)) == 0
    assert out.read_bytes().startswith(before)
    # a killed 3-process job left a part with one more answer; a single run picks it up and merges it
    more = [rec(id=i, image=str(files / f"im{i % 3}.png"), question="q") for i in range(8)]
    write_lines(tmp_path / "req.jsonl", more[:6] + ["oops"] + more[6:])  # "oops" stays line 7
    six = next(answer_requests(small_engine, [{"id": 6, "image": str(files / "im0.png"), "question": "q"}],
                               max_new_tokens=2))
    (tmp_path / "out.jsonl.part2-of-3").write_text(json.dumps(six) + "\n")
    counts = run_job(small_engine, str(req), str(out), 4, 2, progress=False)
    assert counts["answered"] == 1  # id 7 only
    final = read(out)
    assert sorted(json.dumps(r["id"]) for r in final) == [str(i) for i in range(8)] + ["null"]
    assert six in final and out.read_bytes().startswith(before)


# ----------------------------------------------------------------------------- engine failures
def failing_prefill(engine, fails):
    """engine._prefill raising `fails(prompt texts of the batch)` (an exception or None): the step
    both schedulers (static: generate, in-flight: the scheduler's admission) go through."""
    real = engine._prefill

    def prefill(batch, cache):
        error = fails([engine.prompts.decode(row) for row in batch.input_ids.tolist()])
        if error is not None:
            raise error
        return real(batch, cache)
    return prefill


@pytest.mark.parametrize("scheduler", ["static", "inflight"])
def test_an_exception_inside_the_engine_is_that_request_s_record(small_engine, files, tmp_path, monkeypatch, capsys,
                                                                 scheduler):
    bug = failing_prefill(small_engine, lambda texts: RuntimeError("boom") if any("BUG" in t for t in texts) else None)
    monkeypatch.setattr(small_engine, "_prefill", bug)
    lines = [rec(id=i, image=str(files / "im0.png"), question="BUG" if i == 1 else "q") for i in range(3)]
    recs, counts = job(small_engine, tmp_path, lines, scheduler=scheduler)
    assert [r for r in recs if "error" in r] == [
        {"id": 1, "line": 2, "error": "internal error (RuntimeError: boom); please report it", "retry": "always"}]
    assert sorted(r["id"] for r in recs if "text" in r) == [0, 2] and counts["internal_errors"] == 1
    err = capsys.readouterr().err
    assert err.count("Traceback (most recent call last)") == 1 and "RuntimeError: boom" in err
    monkeypatch.undo()  # fixed: the next run answers it
    again, counts = job(small_engine, tmp_path, lines, scheduler=scheduler)
    assert counts["answered"] == 1 and again[-1]["id"] == 1 and "text" in again[-1]
    assert sorted(r["id"] for r in read_results(str(tmp_path / "out.jsonl"))) == [0, 1, 2]


@pytest.mark.parametrize("scheduler", ["static", "inflight"])
def test_out_of_memory_even_alone_is_a_setting_error(small_engine, files, tmp_path, monkeypatch, scheduler):
    calls = []

    def oom(texts):
        calls.append(len(texts))
        return RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                            "you tried to allocate 1099511627776 bytes")
    monkeypatch.setattr(small_engine, "_prefill", failing_prefill(small_engine, oom))
    recs, _ = job(small_engine, tmp_path, [rec(id=i, image=str(files / "im0.png"), question="q") for i in range(3)],
                  scheduler=scheduler)
    # in flight: the three admitted together; then, as static batches: halved, then alone
    assert calls == ([3] if scheduler == "inflight" else []) + [3, 1, 2, 1, 1]
    assert {r["id"] for r in recs} == {0, 1, 2}
    assert all(r["retry"] == "other settings" and r["error"].startswith(
        "out of memory even alone (RuntimeError: [enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
        "allocate memory") for r in recs)


# ----------------------------------------------------------------------------- Python API
def test_api_bad_records_and_non_dict_items(small_engine, files):
    im = str(files / "im0.png")
    items = [None, 42, "text", {"id": "a", "image": make_image(5, 60, 60), "question": "q"}, {"id": True},
             {"id": "b", "question": "q"}, {"id": "a", "image": im, "question": "again"},
             {"id": "c", "image": {"path": im}, "question": "q"}, {"id": "d", "image": im, "prompt": "no placeholder"}]
    out = list(answer_requests(small_engine, items, batch_size=2, max_new_tokens=2))
    errors = [r for r in out if "error" in r]
    assert errors == [
        {"id": None, "line": 1, "error": "expected a request dict, got null"},
        {"id": None, "line": 2, "error": "expected a request dict, got an integer"},
        {"id": None, "line": 3, "error": "expected a request dict, got a string"},
        {"id": None, "line": 5, "error": ID + "a boolean"},
        {"id": "b", "line": 6, "error": "missing field 'image'"},
        {"id": "a", "line": 7, "duplicate": True,
         "error": "duplicate id 'a': line 4 has it first (that line is answered, this one is not)"},
        {"id": "c", "line": 8, "error": "field 'image' must be a file path or a PIL image, got an object"},
        {"id": "d", "line": 9, "error": "field 'prompt' has no '<image>' placeholder; exactly one is required "
                                        "(or give a 'question')"},
    ]
    assert [r["id"] for r in out if "text" in r] == ["a"] and len(out) == 9


@pytest.mark.parametrize("requests, kw, message", [
    ({"id": 1}, {}, "requests: expected an iterable of request dicts, got dict (wrap one request in a list)"),
    ("abc", {}, "requests: expected an iterable of request dicts, got str"),
    (5, {}, "requests: expected an iterable of request dicts, got int"),
    ([], {"batch_size": -1}, "--batch-size -1: the batch size must be an integer >= 1"),
    ([], {"temprature": 0.5}, "answer_requests: unknown option(s) temprature; known: temperature, top_p, seed, stop, "
                              "use_cuda_graph"),
    ([], {"max_new_tokens": 5000}, "--max-new-tokens 5000: too large for the model's context of 2048 tokens; the "
                                   "shortest possible prompt ('<image>' alone) is 37 tokens (36 visual), so at most "
                                   "2011 new tokens fit"),
])
def test_api_bad_settings_raise_at_the_call(small_engine, requests, kw, message):
    with pytest.raises(VtpruneError) as e:
        answer_requests(small_engine, requests, **kw)  # not iterated: the call itself refuses
    assert str(e.value) == message


# ----------------------------------------------------------------------------- the CLI
def cli_case(tmp_path, files, small_dir, how):
    """(argv, env, unprivileged, needles) for one start-up failure."""
    req = write_lines(tmp_path / "req.jsonl", [rec(id=1, image=str(files / "im0.png"), question="q")])
    out, env, unpriv = tmp_path / "out.jsonl", {}, False
    if how == "input-missing":
        req, needles = tmp_path / "nope.jsonl", [f"input file {tmp_path / 'nope.jsonl'}: not found"]
    elif how == "input-directory":
        req, needles = files / "subdir", [f"input file {files / 'subdir'}: is a directory"]
    elif how == "input-fifo":
        req, needles = files / "fifo", [f"input file {files / 'fifo'}: is a FIFO (named pipe)"]
    elif how == "input-symlink-loop":
        req, needles = files / "loop", [f"input file {files / 'loop'}: too many levels of symbolic links"]
    elif how == "input-empty":
        req.write_bytes(b"")
        needles = [f"input file {req}: is empty (no requests)"]
    elif how == "input-unreadable":
        req.chmod(0o000)
        unpriv, needles = True, [f"input file {req}: permission denied"]
    elif how == "output-under-missing-dir":
        out, needles = tmp_path / "no" / "out.jsonl", [f"output file's directory {tmp_path / 'no'}: not found"]
    elif how == "output-under-a-file":
        out = req / "out.jsonl"
        needles = [f"output file {out}: its parent {req} is not a directory"]
    elif how == "output-is-a-directory":
        out, needles = files / "subdir", [f"output file {files / 'subdir'}: is a directory"]
    elif how == "output-unwritable":
        out.write_text("")
        out.chmod(0o444)
        unpriv, needles = True, [f"output file {out}: permission denied"]
    elif how == "output-links-to-input":
        os.symlink(req, out)
        needles = [f"output file {out} is the input file ({req}): refusing to overwrite it"]
    elif how == "output-foreign":
        out.write_text("[1, 2]\n")
        needles = [f"output file {out} line 1 is a list, not a record"]
    elif how == "world-size":
        env, needles = {"WORLD_SIZE": "x"}, ["environment variable WORLD_SIZE='x' is not an integer"]
    extra = []
    if how == "model-missing":
        small_dir, needles = tmp_path / "no-model", [f"model directory {tmp_path / 'no-model'}: not found"]
    elif how == "pruning-bad":
        (tmp_path / "cfg.yaml").write_text("policy: [1]\n")
        extra, needles = ["--pruning", tmp_path / "cfg.yaml"], [f"pruning config {tmp_path / 'cfg.yaml'}: 'policy'"]
    return (["batch", "--model", small_dir, "--input", req, "--output", out, "--no-progress", *extra], env, unpriv,
            needles, out, req)


CLI_CASES = ["input-missing", "input-directory", "input-fifo", "input-symlink-loop", "input-empty",
             "input-unreadable", "output-under-missing-dir", "output-under-a-file", "output-is-a-directory",
             "output-unwritable", "output-links-to-input", "output-foreign", "world-size", "model-missing",
             "pruning-bad"]


@pytest.mark.parametrize("how", CLI_CASES)
def test_cli_start_up_errors_are_one_line(small_dir, files, tmp_path, how):
    argv, env, unpriv, needles, out, req = cli_case(tmp_path, files, small_dir, how)
    if unpriv and not can_drop_privileges():
        pytest.skip("cannot drop the capabilities that bypass file permissions")
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and os.access(p, os.R_OK)}
    r = cli(*argv, unprivileged=unpriv, env=env, timeout=120)
    assert_cli_error(r, *needles)
    after = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and os.access(p, os.R_OK)}
    assert after == before  # nothing written, nothing truncated


def test_cli_max_new_tokens_beyond_the_context_is_refused_at_start_up(small_dir, files, tmp_path):
    req = write_lines(tmp_path / "req.jsonl", [rec(id=1, image=str(files / "im0.png"), question="q")])
    r = cli("batch", "--model", small_dir, "--input", req, "--output", tmp_path / "out.jsonl", "--max-new-tokens",
            "4096", "--no-progress", timeout=300)
    assert_cli_error(r, "--max-new-tokens 4096: too large for the model's context of 2048 tokens",
                     "at most 2011 new tokens fit")
    assert sorted(os.listdir(tmp_path)) == ["req.jsonl"]


# ----------------------------------------------------------------------------- faults
def fault_requests(tmp_path, files, n=24):
    lines = [rec(id=f"q{i}", image=str(files / f"im{i % 3}.png"), question="What is it?" + " really" * (i % 4))
             for i in range(n)]
    lines[3:3] = ["{not json"]
    lines[6:6] = [rec(id="q2", image=str(files / "im0.png"), question="duplicate")]
    lines[8:8] = [rec(id="gone", image=str(files / "nope.png"), question="q")]
    return write_lines(tmp_path / "req.jsonl", lines)


def line_count(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


# In flight with 2 rows, as many as the static batches hold: with its default 4 x batch-size rows
# the job ends before the third kill.
@pytest.mark.parametrize("scheduler", [["--scheduler", "static"], ["--scheduler", "inflight", "--max-rows", "2"]],
                         ids=["static", "inflight"])
def test_sigkill_at_random_points_then_rerun_gives_the_uninterrupted_answers(small_engine, small_dir, files,
                                                                             tmp_path, scheduler):
    req = fault_requests(tmp_path, files)
    ref_out = tmp_path / "reference.jsonl"
    run_job(small_engine, str(req), str(ref_out), batch_size=2, max_new_tokens=6, progress=False, scheduler="static")
    reference = sorted(map(json.dumps, strip_stats(read(ref_out))))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "vtprune", "batch", "--model", small_dir, "--input", str(req), "--output", str(out),
           "--batch-size", "2", "--max-new-tokens", "6", "--no-progress", *scheduler]
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    rng = random.Random(16)
    killed = 0
    for _ in range(4):
        start = line_count(out)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while proc.poll() is None and line_count(out) <= start and time.time() < deadline:
            time.sleep(0.01)  # progress first: each run answers at least one more request
        # then a random point (mid-batch, mid-write, between batches) short enough that a fast machine
        # has not finished all 12 batches yet: CI's CPU once finished 5 batches within 0.5 s
        time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert killed >= 3, "the job should have been killed part way several times"
    recs = read(out)
    answers = [x["id"] for x in recs if "text" in x]
    assert sorted(answers) == sorted(f"q{i}" for i in range(24))  # each id exactly once
    assert sorted(map(json.dumps, strip_stats(recs))) == reference  # the same answers and error records
    assert not (tmp_path / "out.jsonl.inflight").exists()


POISON = """
import os, signal, sys
from vtprune.engine.engine import LlavaEngine
real = LlavaEngine._prefill
def _prefill(self, batch, cache):  # the step of both schedulers
    if any("POISON" in self.prompts.decode(r) for r in batch.input_ids.tolist()):  # as if the OOM killer struck
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, batch, cache)
LlavaEngine._prefill = _prefill
from vtprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("scheduler", ["static", "inflight"])
def test_a_request_that_kills_the_process_cannot_kill_every_rerun(small_engine, small_dir, files, tmp_path,
                                                                  scheduler):
    # the poison's prompt is the shortest: it sorts into the first batch, with three others
    lines = [rec(id=i, image=str(files / f"im{i % 3}.png"), question="POISON" if i == 2 else "q" * (i + 10))
             for i in range(5)]
    req = write_lines(tmp_path / "req.jsonl", lines)
    out = tmp_path / "out.jsonl"
    script = tmp_path / "poisoned.py"
    script.write_text(POISON)
    argv = [sys.executable, str(script), "batch", "--model", small_dir, "--input", str(req), "--output", str(out),
            "--batch-size", "4", "--max-new-tokens", "3", "--no-progress", "--scheduler", scheduler]
    codes = [run(argv, timeout=300).returncode for _ in range(4)]
    # died with the batch in flight; then alone (once, twice); then it is an error record
    assert codes == [-signal.SIGKILL] * 3 + [0]
    recs = read(out)
    assert sorted(r["id"] for r in recs if "text" in r) == [0, 1, 3, 4]
    poison = [r for r in recs if r["id"] == 2]
    assert poison == [{"id": 2, "line": 3, "retry": "other settings", "settings": poison[0]["settings"],
                       "error": "the job died twice while answering this request alone (killed for memory by the "
                                "system, or a crash in native code); not retried with these settings"}]
    assert not (tmp_path / "out.jsonl.inflight").exists()
    # another setting (here: another max_new_tokens, in process, no poison) answers it
    counts = run_job(small_engine, str(req), str(out), batch_size=4, max_new_tokens=2, progress=False)
    assert counts["answered"] == 1
    assert sorted(r["id"] for r in read_results(str(out)) if "text" in r) == [0, 1, 2, 3, 4]
