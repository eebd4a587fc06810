"""`VtpruneLMM`: lmms-eval's `lmms` interface around vtprune.quality.lmms_eval_plugin.EngineLMM.

Imported by lmms-eval itself (the entry point's manifest, LMMS_EVAL_PLUGINS or the launcher name
this class); importing it needs lmms-eval.
"""
from __future__ import annotations

import functools
import sys

from lmms_eval.api.model import lmms

from vtprune.errors import VtpruneError
from vtprune.quality.lmms_eval_plugin import DEFAULT_MAX_NEW_TOKENS, MODEL_NAME, EngineLMM

try:  # every lmms-eval has it; registering here is what lmms-eval < 0.7 reads
    from lmms_eval.api.registry import register_model
except ImportError:  # pragma: no cover
    def register_model(*names):
        return lambda cls: cls

_ARGS = ("pretrained", "pruning", "policy", "budget", "device", "dtype", "batch_size", "max_batch_size",
         "max_new_tokens", "system_prompt")


def _fail(e: Exception):
    """A user error inside lmms-eval's run: one line and exit status 2 (lmms-eval would print a
    traceback and go on with the next task)."""
    print(f"vtprune: error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _one_line_errors(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except VtpruneError as e:
            _fail(e)
    return wrapper


def keep_loglikelihood_pairs() -> bool:
    """lmms-eval 0.7.3's evaluator passes every model response through
    `unwrap_generation_output`, which returns str() of anything but a string, a (str, meta) pair
    or a GenerationResult: a loglikelihood answer (ll, is_greedy) becomes the string "(ll, True)"
    and multiple_choice's process_results then fails unpacking it, for its own llava and llava_hf
    wrappers as for any model. Returning a GenerationResult instead breaks its --use_cache path
    (which strips .text) and its cache hits (stored pairs come back as lists). So the evaluator's
    reference is wrapped to pass (number, bool) pairs through unchanged, only when the installed
    lmms-eval has the bug. Returns whether it was installed."""
    try:
        from lmms_eval import evaluator
    except ImportError:  # pragma: no cover
        return False
    unwrap = getattr(evaluator, "unwrap_generation_output", None)
    if unwrap is None or getattr(unwrap, "_vtprune_keeps_pairs", False):
        return False
    if unwrap((0.5, True))[0] == (0.5, True):  # fixed upstream
        return False

    def unwrap_keeping_pairs(output):
        if (isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[1], bool)
                and isinstance(output[0], (int, float)) and not isinstance(output[0], bool)):
            return (float(output[0]), output[1]), None
        return unwrap(output)

    unwrap_keeping_pairs._vtprune_keeps_pairs = True
    evaluator.unwrap_generation_output = unwrap_keeping_pairs
    return True


def _distributed(device):
    """(rank, world size, local rank, accelerator or None) of this process."""
    try:
        from accelerate import Accelerator
    except ImportError:  # pragma: no cover
        import os

        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)), None)
    acc = Accelerator()
    return acc.process_index, acc.num_processes, acc.local_process_index, acc


@register_model(MODEL_NAME)
class VtpruneLMM(lmms):
    """`--model vtprune`: LLaVA-1.5 through the vtprune engine, with or without pruning."""

    is_simple = True

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """model_args plus lmms-eval's --batch_size / --max_batch_size / --device. lmms-eval passes
        --batch_size always (default 1), so a batch_size in model_args wins over a 1; two different
        values given both ways are refused (lmms-eval's own models fail on any repeat with a
        TypeError)."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string or "")
        for key, value in (additional_config or {}).items():
            if value is None:
                continue
            if key in args and str(args[key]) != str(value):
                if key == "batch_size" and str(value) == "1":
                    continue
                _fail(VtpruneError(f"{key} given twice: {key}={args[key]} in --model_args and {value} on the "
                                   f"command line"))
            args.setdefault(key, value)
        return cls(**args)

    def __init__(self, pretrained: str | None = None, pruning: str | None = None, policy: str | None = None,
                 budget: int | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size=1, max_batch_size=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 system_prompt: str | None = None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            _fail(VtpruneError(f"unknown model_args {', '.join(sorted(kwargs))} (vtprune takes: {', '.join(_ARGS)})"))
        if not pretrained:
            _fail(VtpruneError("model_args: pretrained=DIR (a llava-hf model directory) is required"))
        rank, world, local, self.accelerator = _distributed(device)
        if world > 1:
            import torch

            if device is None and torch.cuda.is_available():
                device = "cuda"
            if device is not None and str(device).startswith("cuda"):
                device = f"cuda:{local}"  # one GPU per process, as lmms-eval's llava wrappers
        keep_loglikelihood_pairs()
        try:
            self._impl = EngineLMM(pretrained, pruning=pruning, policy=policy, budget=budget, device=device,
                                   dtype=dtype, batch_size=batch_size, max_batch_size=max_batch_size,
                                   max_new_tokens=max_new_tokens, system_prompt=system_prompt,
                                   rank=rank, world_size=world)
        except VtpruneError as e:
            _fail(e)
        self._rank, self._world_size = rank, world

    # lmms-eval reads these
    @property
    def device(self):
        return self._impl.engine.device

    @property
    def batch_size(self):
        return self._impl.batch_size

    @property
    def engine(self):
        return self._impl.engine

    def _sync(self):
        self._impl.task_dict = self.task_dict
        self._impl.rank, self._impl.world_size = self._rank, self._world_size

    @_one_line_errors
    def generate_until(self, requests):
        self._sync()
        return self._impl.generate_until(requests)

    @_one_line_errors
    def loglikelihood(self, requests):
        self._sync()
        return self._impl.loglikelihood(requests)

    @_one_line_errors
    def generate_until_multi_round(self, requests):
        return self._impl.generate_until_multi_round(requests)
