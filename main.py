"""The main job: answer questions about images with the vtprune engine, without and with
two-stage visual-token pruning, and show what each costs (tokens per stage, FLOPs, time).

    python main.py                                   # the embedded SynthVQA model and its trained heads
    python main.py --model DIR                       # any llava-hf LLaVA-1.5 directory
    python main.py --pruning configs/vision_token_pruning.yaml

Each answer is marked against the expected one: [right] / [wrong] (exact match after
normalisation) for questions, and the caption also with its BLEU against the reference caption
(the metrics of `vtprune eval`).
"""
import argparse
import sys
import time
import warnings


def _describe(stats) -> str:
    from vtprune.cli import _runs

    return (f"visual tokens per layer {_runs(stats['visual_tokens_per_layer'])}; prefill FLOPs "
            f"{stats['prefill_flops'] / 1e9:.3f} G ({stats['prefill_flops'] / stats['prefill_flops_unpruned']:.0%} "
            f"of unpruned)")


def _is_caption(question: str) -> bool:
    return question.startswith("Describe")


def _mark(text: str, expected: str, question: str) -> str:
    """[right] / [wrong] (exact match after normalisation); captions also get their BLEU."""
    from vtprune.quality.metrics import bleu, exact_match

    verdict = "right" if exact_match(text, expected) else "wrong"
    return f"[{verdict}, BLEU {bleu([text], [expected]):.1f}]" if _is_caption(question) else f"[{verdict}]"


def _score(results, examples) -> str:
    """'3 of 4 questions right, caption BLEU 61.2' (BLEU over the captions, as `vtprune eval`)."""
    from vtprune.quality.metrics import bleu, exact_match

    qa = [(r.text, e[2]) for r, e in zip(results, examples) if not _is_caption(e[1])]
    caps = [(r.text, e[2]) for r, e in zip(results, examples) if _is_caption(e[1])]
    out = f"{sum(exact_match(t, a) for t, a in qa)} of {len(qa)} questions right"
    if caps:
        out += f", caption BLEU {bleu([t for t, _ in caps], [a for _, a in caps]):.1f}"
    return out


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="llava-hf model directory (default: the embedded SynthVQA model)")
    parser.add_argument("--pruning", default=None,
                        help="pruning config YAML (default: the embedded model's trained config, or the "
                             "design's settings scaled to the model)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    from vtprune import LlavaEngine, format_prompt
    from vtprune.cli import check_model_dir, check_yaml, report_error
    from vtprune.demo import ASSET_MODEL, default_model_dir, default_pruning, demo_examples, has_trained_default
    from vtprune.engine.arguments import check_max_new_tokens
    from vtprune.engine.runtime import default_device_dtype
    from vtprune.pruning import PruningConfig

    try:
        # the user's arguments before the model loads
        check_max_new_tokens(args.max_new_tokens)
        if args.model is not None:
            check_model_dir(args.model)
        if args.pruning is not None:
            check_yaml(args.pruning, "pruning config")
        model_dir = args.model or default_model_dir()
        device, dtype = default_device_dtype(args.device, args.dtype)
        t = time.perf_counter()
        engine = LlavaEngine.from_pretrained(model_dir, device=device, dtype=dtype)
        print(f"model: {model_dir} ({device}, {dtype}), loaded in {time.perf_counter() - t:.1f} s")
        if args.model is None and not has_trained_default():
            print(f"note: this install lacks the embedded model's files ({ASSET_MODEL}), so a random model of "
                  f"the LLaVA-1.5 shape stands in and its answers are noise; pass --model DIR for a real checkpoint")
        examples = demo_examples(5)
        images = [e[0] for e in examples]
        prompts = [format_prompt(e[1]) for e in examples]
        cfg = args.pruning or (default_pruning() if args.model is None else None) or PruningConfig.scaled_for(
            engine.cfg.num_visual_tokens, engine.cfg.text.num_layers,
            pruner_d_internal=min(512, engine.cfg.text.hidden_size))
        print(f"pruning: {cfg if isinstance(cfg, str) else 'the design defaults scaled to this model'}")
        runs = {}
        for name in ("unpruned", "two-stage pruning"):
            if name != "unpruned":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    engine.set_pruning(cfg)
                for w in caught:
                    print(f"note: {w.message}")
            engine.generate(images[:1], prompts[:1], max_new_tokens=2)  # warm-up (allocator, kernels)
            t = time.perf_counter()
            results = engine.generate(images, prompts, max_new_tokens=args.max_new_tokens)
            runs[name] = (results, time.perf_counter() - t)

        for i, (_, question, expected) in enumerate(examples):
            print(f"\nQ: {question}\n  {'expected':>17}: {expected!r}")
            for name, (results, _) in runs.items():
                r = results[i]
                print(f"  {name:>17}: {r.text!r}  {_mark(r.text, expected, question)}\n  {'':>17}  "
                      f"{r.stats['prompt_tokens']} prompt tokens ({r.stats['visual_tokens']} visual in), "
                      f"{_describe(r.stats)}")
        print()
        for name, (results, seconds) in runs.items():
            n = sum(r.stats["generated_tokens"] for r in results)
            print(f"{name:>17}: {_score(results, examples)}; batch of {len(results)} in {seconds * 1e3:.0f} ms "
                  f"(first token {results[0].stats['time_to_first_token_s'] * 1e3:.0f} ms, {n / seconds:.0f} "
                  f"generated tok/s)")
    except (Exception, KeyboardInterrupt) as e:
        # any bad input (a file as --model, a bad --pruning, --device tpu, an unreadable file)
        # is one line `main.py: error: ...` and exit status 2; a bug keeps its traceback
        code = report_error("main.py", e)
        if code is None:
            raise
        return code
    return 0


if __name__ == "__main__":
    sys.exit(run())
