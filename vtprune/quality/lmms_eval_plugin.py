"""lmms-eval model plugin: standard benchmarks (GQA, POPE, MME, ...) through the vtprune engine,
with or without pruning, for users who have real LLaVA-1.5 weights.

    python -m vtprune.quality.lmms_eval_plugin --model vtprune \\
        --model_args pretrained=llava-1.5-7b-hf,pruning=configs/vision_token_pruning.yaml \\
        --tasks gqa,pope,mme --batch_size 16 --output_path logs/

The launcher registers the model under the name "vtprune" and hands its arguments to lmms-eval's
own command line (`lmms_eval.__main__.cli_evaluate`). model_args: pretrained (llava-hf directory),
pruning (YAML), policy and budget (a baseline), device, dtype, batch_size, max_new_tokens.
`EngineLMM` holds the logic and needs no lmms-eval (tests use it directly); `VtpruneLMM` is the
registered lmms subclass built from it when lmms-eval is installed.
"""
from __future__ import annotations

import sys

from ..engine.inputs import IMAGE_TOKEN, format_prompt


def _flatten(visuals) -> list:
    out = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        out += _flatten(v) if isinstance(v, (list, tuple)) else [v]
    return out


class EngineLMM:
    """generate_until / loglikelihood over lmms-eval requests (objects with `.args`)."""

    def __init__(self, pretrained: str, pruning: str | None = None, policy: str | None = None,
                 budget: int | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 16, max_new_tokens: int = 32):
        import argparse

        from ..cli import _default_device_dtype, pruning_spec
        from ..engine import LlavaEngine

        device, dtype = _default_device_dtype(device, dtype)
        spec = pruning_spec(argparse.Namespace(pruning=pruning, policy=policy,
                                               budget=None if budget is None else int(budget)))
        self.engine = LlavaEngine.from_pretrained(pretrained, device=device, dtype=dtype, pruning=spec)
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.task_dict: dict = {}

    def _image_and_prompt(self, context: str, doc_to_visual, doc_id, task, split):
        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        if len(visuals) != 1:
            raise ValueError(f"vtprune: LLaVA-1.5 takes one image per question, {task}/{doc_id} has {len(visuals)}")
        question = context.replace(IMAGE_TOKEN, "").strip()
        return visuals[0], format_prompt(question)

    def generate_until(self, requests) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        # one batch per distinct generation settings, in order
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for idx in groups.values():
            gen = dict(requests[idx[0]].args[1])
            until = gen.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen.get("max_new_tokens", self.max_new_tokens))
            temperature = float(gen.get("temperature", 0.0) or 0.0)
            top_p = float(gen.get("top_p", 1.0) or 1.0)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                pairs = [self._image_and_prompt(*requests[i].args[:1], *requests[i].args[2:6]) for i in chunk]
                results = self.engine.generate([p[0] for p in pairs], [p[1] for p in pairs], max_new_tokens=max_new,
                                               temperature=temperature, top_p=top_p, stop=until or None)
                for i, r in zip(chunk, results):
                    out[i] = r.text
        return out  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        res = []
        for r in requests:
            context, target, doc_to_visual, doc_id, task, split = r.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            image, prompt = self._image_and_prompt(context, doc_to_visual, doc_id, task, split)
            res += self.engine.score([image], [prompt], [" " + continuation.strip()])
        return res

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vtprune: multi-round generation is not supported")


def _registered_class():
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model

    @register_model("vtprune")
    class VtpruneLMM(lmms):
        def __init__(self, pretrained: str, **kwargs):
            lmms.__init__(self)
            self._impl = EngineLMM(pretrained, **kwargs)
            self._rank, self._world_size = 0, 1

        def generate_until(self, requests):
            self._impl.task_dict = self.task_dict
            return self._impl.generate_until(requests)

        def loglikelihood(self, requests):
            self._impl.task_dict = self.task_dict
            return self._impl.loglikelihood(requests)

        def generate_until_multi_round(self, requests):
            return self._impl.generate_until_multi_round(requests)

    return VtpruneLMM


def main() -> int:
    try:
        from lmms_eval.__main__ import cli_evaluate
    except ImportError:
        print("vtprune: error: lmms-eval is not installed (pip install lmms-eval)", file=sys.stderr)
        return 2
    _registered_class()
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
