"""Shared by the benchmark scripts: the device's name and writing results as JSON + markdown."""
import datetime
import json
import os
import platform

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def today() -> str:
    return datetime.date.today().isoformat()


def write_results(out_dir: str, kind: str, tag, result: dict, table: str, quiet: bool = False) -> str:
    """Writes <out_dir>/<tag or kind-device-date>.json and .md; returns the path stem. `quiet`:
    without printing (a partial result written while a benchmark goes on)."""
    os.makedirs(out_dir, exist_ok=True)
    name = result["device_name"].replace(" ", "_").replace("/", "_")
    stem = os.path.join(out_dir, tag or f"{kind}-{name}-{result['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table)
    if not quiet:
        print("\n" + table)
        print(f"wrote {stem}.json/.md")
    return stem
