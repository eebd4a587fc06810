"""Training and evaluation data: JSONL records {"image": path, "question": str, "answer": str}
with optional "type" (a string; "caption" is scored with BLEU) and "id" (a string or an integer).

The file itself must be usable (a readable regular file): otherwise one error names the path and
the reason. A bad *record* is skipped and reported with its line number, never fatal (one bad
line in 100k does not stop a run): a line that is not UTF-8, not JSON, not a JSON object, a
missing, empty or mistyped field, an image that is missing or not an image. Images are checked
when the file is read, so a run does not die hours in. The skipped lines are kept in
`TrainingData.skipped` ([(line, reason)]) and reported as warnings `PATH:LINE: skipped: REASON`
(the first five, then a count); a file with no usable record is an error.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

from ..engine.inputs import load_image
from ..errors import VtpruneError
from ..files import check_file, decode_utf8, iter_lines

# skipped lines reported one by one; the rest are counted in one more warning
_REPORTED = 5


@dataclass
class Example:
    line: int
    image: str
    question: str
    answer: str
    kind: str = ""   # the record's optional "type" (evaluation: "caption" is scored with BLEU)
    id: str = ""     # the record's optional "id"


class TrainingData:
    def __init__(self, path: str, check_images: bool = True, what: str = "training data"):
        self.path = check_file(path, what)
        self.examples: list[Example] = []
        self.skipped: list[tuple[int, str]] = []
        base = os.path.dirname(os.path.abspath(self.path))
        for line_no, raw in iter_lines(self.path, what):
            where = f"{what} {self.path}, line {line_no}: "
            try:
                text = decode_utf8(raw, what, self.path, line=line_no)
                example = self._parse(text, base, check_images)
                example.line = line_no
                self.examples.append(example)
            except VtpruneError as e:
                self.skipped.append((line_no, str(e)[len(where):] if str(e).startswith(where) else str(e)))
        if not self.examples:
            first = f"; line {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped else ""
            n = len(self.skipped)
            raise VtpruneError(f"{what} {self.path}: no usable records ({n} line{'s' * (n != 1)} skipped{first})")
        for line_no, reason in self.skipped[:_REPORTED]:
            warnings.warn(f"{self.path}:{line_no}: skipped: {reason}", stacklevel=2)
        if len(self.skipped) > _REPORTED:
            warnings.warn(f"{self.path}: {len(self.skipped) - _REPORTED} more lines skipped "
                          f"({len(self.skipped)} in all, {len(self.examples)} records used)", stacklevel=2)

    @staticmethod
    def _parse(text: str, base: str, check_images: bool) -> Example:
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise VtpruneError(f"not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise VtpruneError("JSON nested too deeply") from None
        if not isinstance(rec, dict):
            raise VtpruneError(f"expected a JSON object, got {_json_type(rec)}")
        for key in ("image", "question", "answer"):
            if key not in rec:
                raise VtpruneError(f"'{key}' is missing")
            if not isinstance(rec[key], str):
                raise VtpruneError(f"'{key}' must be a string, got {_json_type(rec[key])}")
            if not rec[key].strip():
                raise VtpruneError(f"'{key}' is empty")
        kind = rec.get("type")
        if kind is not None and not isinstance(kind, str):
            raise VtpruneError(f"'type' must be a string, got {_json_type(kind)}")
        rid = rec.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
            raise VtpruneError(f"'id' must be a string or an integer, got {_json_type(rid)}")
        image = rec["image"] if os.path.isabs(rec["image"]) else os.path.join(base, rec["image"])
        if check_images:
            check_file(image, "image")  # a FIFO or a directory is refused before PIL opens it
            load_image(image).close()
        return Example(0, image, rec["question"], rec["answer"], kind or "", "" if rid is None else str(rid))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, as the user wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"
