"""The finished parts of the training package: the annealing schedule and the data reader."""
import json
import math

import pytest
from conftest import make_image

from vtprune import VtpruneError
from vtprune.training import TrainingData, temperature_at
from vtprune.training.ema import WeightAverage
from vtprune.training.schedule import lr_factor_at


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


def test_lr_schedules():
    assert [lr_factor_at(s, 10, "constant") for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert lr_factor_at(0, 11, "cosine") == pytest.approx(1.0)
    assert lr_factor_at(5, 11, "cosine") == pytest.approx(0.5)
    assert lr_factor_at(10, 11, "cosine") == pytest.approx(0.0, abs=1e-12)  # the last step takes no step
    f = [lr_factor_at(s, 300, "cosine") for s in range(300)]
    assert all(b < a for a, b in zip(f, f[1:]))
    assert lr_factor_at(0, 1, "cosine") == pytest.approx(1.0)  # a one-step run still steps
    with pytest.raises(ValueError, match="lr schedule"):
        lr_factor_at(0, 10, "linear")


def test_weight_average_follows_the_ema_recurrence():
    import torch
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    ema = WeightAverage(m, 0.9)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    for t in range(30):
        with torch.no_grad():
            m.weight.add_(torch.randn_like(m.weight))
            m.bias.add_(1.0)
        ema.update(m)
        d = min(0.9, (1 + t) / (10 + t))
        ref = {k: d * ref[k] + (1 - d) * v for k, v in m.state_dict().items()}
    for k, v in ema.state().items():
        torch.testing.assert_close(v, ref[k])
    raw = {k: v.clone() for k, v in m.state_dict().items()}
    with ema.swap_into(m):
        torch.testing.assert_close(m.weight, ref["weight"])
    assert torch.equal(m.weight, raw["weight"]) and torch.equal(m.bias, raw["bias"])  # restored
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(m, 1.0)


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
    with pytest.warns(UserWarning, match=r"train.jsonl:2: skipped: not valid JSON"):
        data = TrainingData(str(tmp_path / "train.jsonl"))
    assert [e.line for e in data.examples] == [1, 7] and data[0].image == str(tmp_path / "a.png")
    reasons = dict(data.skipped)
    assert set(reasons) == {2, 3, 4, 5, 6}
    assert reasons[3] == "'answer' is empty" and reasons[6] == "'image' is missing"
    assert reasons[4] == f"image {tmp_path / 'missing.png'}: not found" and "not an image" in reasons[5]


def test_no_usable_records_is_an_error(tmp_path):
    (tmp_path / "t.jsonl").write_text("{oops\n")
    with pytest.raises(VtpruneError, match=r"t.jsonl: no usable records \(1 line skipped; line 1: not valid JSON"):
        TrainingData(str(tmp_path / "t.jsonl"))
    with pytest.raises(VtpruneError, match="training data .*none.jsonl: not found"):
        TrainingData(str(tmp_path / "none.jsonl"))


def test_task_losses_average_per_token_or_per_example():
    """"token": F.cross_entropy / F.kl_div('batchmean') over all answer positions; "example": the
    mean over rows of each row's own mean, so a short answer weighs as much as a long caption."""
    import torch
    import torch.nn.functional as F

    from vtprune.training.losses import answer_weights, task_losses

    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 0, 0, 0, 0, 2, 3, 3])  # row 1 has no answer position
    student, teacher = torch.randn(8, 11, generator=g), torch.randn(8, 11, generator=g)
    targets = torch.randint(0, 11, (8,), generator=g)
    ce, kl = task_losses(student, teacher, targets, answer_weights(torch.bincount(rows, minlength=4), "token"))
    torch.testing.assert_close(ce, F.cross_entropy(student, targets))
    torch.testing.assert_close(kl, F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1),
                                            log_target=True, reduction="batchmean"))
    ce_e, kl_e = task_losses(student, teacher, targets, answer_weights(torch.bincount(rows, minlength=4), "example"))
    per_ce, per_kl = [], []
    for r in (0, 2, 3):
        i = rows == r
        per_ce.append(F.cross_entropy(student[i], targets[i]))
        per_kl.append(F.kl_div(F.log_softmax(student[i], -1), F.log_softmax(teacher[i], -1), log_target=True,
                               reduction="batchmean"))
    torch.testing.assert_close(ce_e, torch.stack(per_ce).mean())
    torch.testing.assert_close(kl_e, torch.stack(per_kl).mean())
    assert not torch.allclose(ce_e, ce)
