"""The main job: answer questions about images with the vtprune engine and show what it costs.

    python main.py                       # embedded default model (built locally, no download)
    python main.py --model DIR           # any llava-hf LLaVA-1.5 directory, e.g. llava-1.5-7b-hf
"""
import argparse
import sys
import time


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="llava-hf model directory (default: embedded tiny model)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    from vtprune import LlavaEngine, VtpruneError, format_prompt
    from vtprune.cli import _default_device_dtype
    from vtprune.demo import DEMO_QUESTIONS, default_model_dir, demo_image

    try:
        model_dir = args.model or default_model_dir()
        device, dtype = _default_device_dtype(args.device, args.dtype)
        t = time.perf_counter()
        engine = LlavaEngine.from_pretrained(model_dir, device=device, dtype=dtype)
        print(f"model: {model_dir} ({device}, {dtype}), loaded in {time.perf_counter() - t:.1f} s")
        if args.model is None:
            print("note: the embedded default has random weights, so its answers are noise; "
                  "pass --model DIR for a real checkpoint")
        images = [demo_image(i) for i in range(len(DEMO_QUESTIONS))]
        prompts = [format_prompt(q) for q in DEMO_QUESTIONS]

        engine.generate(images[:1], prompts[:1], max_new_tokens=2)  # warm-up (allocator, kernels)
        t = time.perf_counter()
        results = engine.generate(images, prompts, max_new_tokens=args.max_new_tokens)
        batched = time.perf_counter() - t
        for q, r in zip(DEMO_QUESTIONS, results):
            s = r.stats
            print(f"\nQ: {q}\nA: {r.text!r}\n   {s['prompt_tokens']} prompt tokens ({s['visual_tokens']} visual), "
                  f"{s['generated_tokens']} generated")
        t = time.perf_counter()
        for im, p in zip(images, prompts):
            engine.generate([im], [p], max_new_tokens=args.max_new_tokens)
        single = time.perf_counter() - t
        n = sum(r.stats["generated_tokens"] for r in results)
        print(f"\nbatch of {len(prompts)}: {batched * 1e3:.0f} ms "
              f"(first token {results[0].stats['time_to_first_token_s'] * 1e3:.0f} ms, {n / batched:.0f} tok/s); "
              f"one by one: {single * 1e3:.0f} ms")
    except VtpruneError as e:
        print(f"main.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
