"""Training data: JSONL records {"image": path, "question": str, "answer": str}.

Bad records (bad JSON, missing or empty fields, an image that is missing or not an image) are
reported with their line number (a warning, and in `TrainingData.skipped`) and skipped, never
fatal. Images are checked when the file is read, so a run does not die hours in.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

from ..engine.inputs import load_image
from ..errors import VtpruneError


@dataclass
class Example:
    line: int
    image: str
    question: str
    answer: str
    kind: str = ""   # the record's optional "type" (evaluation: "caption" is scored with BLEU)
    id: str = ""     # the record's optional "id"


class TrainingData:
    def __init__(self, path: str, check_images: bool = True):
        if not os.path.isfile(path):
            raise VtpruneError(f"training data not found: {path}")
        self.path = path
        self.examples: list[Example] = []
        self.skipped: list[tuple[int, str]] = []
        base = os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    self.examples.append(self._parse(raw, line_no, base, check_images))
                except VtpruneError as e:
                    self.skipped.append((line_no, str(e)))
                    warnings.warn(f"{path}:{line_no}: skipped: {e}", stacklevel=2)
        if not self.examples:
            raise VtpruneError(f"{path}: no usable training records ({len(self.skipped)} skipped)")

    @staticmethod
    def _parse(raw: str, line_no: int, base: str, check_images: bool) -> Example:
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise VtpruneError(f"bad JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise VtpruneError("expected a JSON object")
        for key in ("image", "question", "answer"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise VtpruneError(f"missing or empty '{key}'")
        image = rec["image"] if os.path.isabs(rec["image"]) else os.path.join(base, rec["image"])
        if check_images:
            load_image(image).close()
        return Example(line_no, image, rec["question"], rec["answer"], str(rec.get("type", "") or ""),
                       str(rec.get("id", "") or ""))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]
