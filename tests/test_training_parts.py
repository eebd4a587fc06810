"""The finished parts of the training package: the annealing schedule and the data reader."""
import json
import math

import pytest
from conftest import make_image

from vtprune import VtpruneError
from vtprune.training import TrainingData, temperature_at


def test_annealing_schedule_values():
    total = 1000
    assert temperature_at(0, total) == pytest.approx(1.0)
    assert temperature_at(250, total) == pytest.approx(math.sqrt(0.1))  # geometric midpoint at 1/4 of training
    assert temperature_at(500, total) == pytest.approx(0.1)
    assert temperature_at(999, total) == pytest.approx(0.1)  # holds after anneal_rate of the steps
    taus = [temperature_at(s, total) for s in range(0, 501)]
    assert all(b < a for a, b in zip(taus, taus[1:]))
    assert temperature_at(100, 100, 2.0, 0.5, anneal_rate=1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        temperature_at(0, 10, temperature=0.1, temperature_min=1.0)


def test_bad_records_are_reported_with_line_numbers_and_skipped(tmp_path):
    make_image(1).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_text("no image")
    lines = [
        json.dumps({"image": "a.png", "question": "What?", "answer": "A cat."}),
        "{bad json",
        json.dumps({"image": "a.png", "question": "What?", "answer": ""}),
        json.dumps({"image": "missing.png", "question": "Q", "answer": "A"}),
        json.dumps({"image": "bad.png", "question": "Q", "answer": "A"}),
        json.dumps({"question": "Q", "answer": "A"}),
        json.dumps({"image": str(tmp_path / "a.png"), "question": "Again?", "answer": "Yes."}),
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"train.jsonl:2: skipped: bad JSON"):
        data = TrainingData(str(tmp_path / "train.jsonl"))
    assert [e.line for e in data.examples] == [1, 7] and data[0].image == str(tmp_path / "a.png")
    reasons = dict(data.skipped)
    assert set(reasons) == {2, 3, 4, 5, 6}
    assert "empty 'answer'" in reasons[3] and "file not found" in reasons[4] and "not an image" in reasons[5]
    assert "missing or empty 'image'" in reasons[6]


def test_no_usable_records_is_an_error(tmp_path):
    (tmp_path / "t.jsonl").write_text("{oops\n")
    with pytest.warns(UserWarning), pytest.raises(VtpruneError, match="no usable training records"):
        TrainingData(str(tmp_path / "t.jsonl"))
    with pytest.raises(VtpruneError, match="training data not found"):
        TrainingData(str(tmp_path / "none.jsonl"))
