"""The `vtprune` command line.

Bad input ends with one line on stderr (`vtprune: error: ...`) and exit status 2; a bug keeps
its traceback. Subcommands: generate, batch, train, eval.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings

from . import demo
from .batch import check_scheduler, check_world, merge_parts, open_job
from .engine import LlavaEngine, format_prompt
from .engine import arguments as check
from .engine.inputs import IMAGE_TOKEN
from .engine.runtime import default_device_dtype
from .errors import VtpruneError
from .files import (check_dir, check_output_dir, check_output_file, check_readable, os_error_reason,
                    read_yaml)
from .quality.evaluate import (comparison_settings, environment, evaluate, load_records, output_paths,
                               run_settings, to_markdown, write_outputs)


def _add_model_args(p: argparse.ArgumentParser, repeatable: bool = False, embedded_default: bool = False) -> None:
    if embedded_default:
        p.add_argument("--model", default=None, help="llava-hf model directory (config.json, *.safetensors, "
                                                     "tokenizer; default: the embedded SynthVQA model, as main.py)")
    else:
        p.add_argument("--model", required=True, help="llava-hf model directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)")
    more = " (repeat with --compare)" if repeatable else ""
    p.add_argument("--pruning", default=None, action="append" if repeatable else "store",
                   help="pruning config YAML (e.g. configs/vision_token_pruning.yaml)" + more)
    p.add_argument("--policy", default=None,
                   help="override the config's policy: two_stage, fastv, pdrop, dart, visionzip, divprune, random "
                        "or a registered one (a baseline needs --budget)")
    p.add_argument("--policy-module", default=None, action="append", metavar="MODULE",
                   help="import MODULE first (a Python module on the path that registers pruning policies "
                        "with vtprune.pruning.register_policy); repeatable")
    p.add_argument("--budget", type=int, default=None, action="append" if repeatable else "store",
                   help="baselines: average visual tokens per decoder layer" + more)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is two lines (the error and where the options are listed), not
    the full usage: generate's and eval's usage alone wrap to 7 lines at 80 columns."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vtprune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer questions about images")
    _add_model_args(g, embedded_default=True)
    g.add_argument("--image", action="append", required=True, help="image file (repeat for a batch)")
    g.add_argument("--prompt", action="append", required=True,
                   help="a question, or a full prompt containing one <image> (repeat, one per --image)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object per answer")
    g.add_argument("--compile", action="store_true",
                   help="decode steps through torch.compile (reduce-overhead on a GPU) instead of the CUDA graph")

    b = sub.add_parser("batch", help="answer a JSONL file of requests (resumable)")
    _add_model_args(b)
    b.add_argument("--input", required=True, help='JSONL: {"id", "image", "prompt" or "question"} per line')
    b.add_argument("--output", required=True, help="JSONL answers (appended to; re-run to resume)")
    b.add_argument("--batch-size", type=int, default=16,
                   help="requests prefilled together (static: also decoded together)")
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--scheduler", default="inflight", choices=("inflight", "static"),
                   help="inflight: finished rows are refilled between decode steps (default); static: each batch "
                        "decodes until its longest answer is done")
    b.add_argument("--kv-budget-gb", type=float, default=None,
                   help="in-flight KV cache memory; rows in flight = what it holds of requests' pruned KV rows "
                        "(default: on CUDA 60%% of the memory free after the weights, on CPU 2 GB)")
    b.add_argument("--max-rows", type=int, default=None, help="in-flight decode rows at most (default 4 x batch size)")
    b.add_argument("--no-progress", action="store_true")
    e = sub.add_parser("eval", help="accuracy, BLEU, visual tokens, FLOPs and latency on a JSONL data set")
    _add_model_args(e, repeatable=True)
    e.add_argument("--data", required=True, help='JSONL: {"image", "question", "answer"[, "type", "id"]} per line')
    e.add_argument("--out", default=None, help="results path stem: writes STEM.json and STEM.md (and STEM.png "
                                                "with --compare); default: print only")
    e.add_argument("--compare", action="store_true",
                   help="unpruned, each --pruning (two-stage) config, and every training-free policy (fastv, "
                        "pdrop, dart, visionzip, divprune, random and registered ones) at each config's budget and "
                        "at every --budget; plots accuracy against visual tokens")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N records only")
    e.add_argument("--predictions", default=None,
                   help="write every prediction to this JSONL file, each tagged with its setting (all of "
                        "them with --compare)")
    e.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="train the token merger and pruner heads (adversarial, frozen LLaVA)")
    t.add_argument("--model", required=True, help="llava-hf model directory (stays frozen)")
    t.add_argument("--config", required=True, help="pruning config YAML (two_stage; loss weights, learning rates)")
    t.add_argument("--data", required=True, help='JSONL: {"image", "question", "answer"} per line')
    t.add_argument("--out", required=True, help="run directory: log.jsonl, checkpoint/, pruning.safetensors/.yaml")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=4, help="examples per step and process")
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    t.add_argument("--dtype", default=None, help="frozen model dtype (default: bfloat16 on cuda, float32 on cpu)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--adv-loss", default="hinge", choices=["hinge", "non_saturating"])
    t.add_argument("--save-every", type=int, default=200, help="steps between checkpoints")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute decoder layers in the backward pass (the 7B model on one GPU)")
    t.add_argument("--no-progress", action="store_true")
    return parser


def pruning_spec(args):
    """--pruning / --policy / --budget -> what LlavaEngine(pruning=...) takes (None: no pruning)."""
    if args.pruning is None and args.policy is None:
        return None
    # local: importing pruning loads (and on first use JIT-builds) the compiled ops, which a run
    # without pruning must not wait for
    from .pruning import PruningConfig

    if args.pruning:
        check_yaml(args.pruning, "pruning config")
    cfg = PruningConfig.from_yaml(args.pruning) if args.pruning else PruningConfig()
    if args.policy:
        cfg.policy = args.policy
    if args.budget is not None:
        cfg.budget = args.budget
    cfg.check()
    return cfg


def check_model_dir(path) -> None:
    """The model directory exists and can be listed (the same error as LlavaEngine.from_pretrained
    gives, before anything slow runs)."""
    check_dir(path, "model directory")


def check_yaml(path, what: str) -> None:
    """The file is a readable regular file of UTF-8 YAML (each problem one error naming the path);
    its keys are checked where it is loaded."""
    read_yaml(path, what)


def _cmd_generate(args) -> int:
    if len(args.image) != len(args.prompt):
        raise VtpruneError(f"got {len(args.image)} --image and {len(args.prompt)} --prompt: give one prompt per image")
    # every argument and path before the (slow) model load: a bad one fails in a second, not after it
    check.check_max_new_tokens(args.max_new_tokens)
    check.check_temperature(args.temperature)
    check.check_top_p(args.top_p)
    check.check_seed(args.seed)
    check.check_stops(args.stop)
    model = args.model
    if model is None:  # the embedded model, as main.py (a random stand-in when the install lacks it)
        if not demo.has_trained_default():
            print(f"vtprune: note: the embedded model's files are missing ({demo.ASSET_MODEL}): a random model "
                  f"answers (noise); pass --model DIR", file=sys.stderr)
        model = demo.default_model_dir()
    check_model_dir(model)
    for image in args.image:
        check_readable(image, "image")
    pruning = pruning_spec(args)
    device, dtype = default_device_dtype(args.device, args.dtype)
    engine = LlavaEngine.from_pretrained(model, device=device, dtype=dtype, pruning=pruning)
    engine.compile_decode = args.compile
    prompts = [p if IMAGE_TOKEN in p else format_prompt(p) for p in args.prompt]
    results = engine.generate(args.image, prompts, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop)
    for image, prompt, r in zip(args.image, args.prompt, results):
        if args.json:
            print(json.dumps({"image": image, "prompt": prompt, "text": r.text,
                              "token_ids": r.token_ids, "stats": r.stats}))
        else:
            s = r.stats
            print(f"[{image}] {prompt}\n  {r.text}\n  ({s['prompt_tokens']} prompt tokens, {s['visual_tokens']} "
                  f"visual; {s['generated_tokens']} generated; first token {s['time_to_first_token_s'] * 1e3:.0f} ms, "
                  f"decode {s['decode_s'] * 1e3:.0f} ms)")
            if engine.plan is not None:
                print(f"  visual tokens per layer: {_runs(s['visual_tokens_per_layer'])}; prefill FLOPs "
                      f"{s['prefill_flops'] / 1e9:.2f} G of {s['prefill_flops_unpruned'] / 1e9:.2f} G unpruned")
    return 0


def _runs(values) -> str:
    """[288]*10 + [200]*10 -> '288 x10, 200 x10'."""
    out, prev, n = [], None, 0
    for v in list(values) + [None]:
        if v == prev:
            n += 1
            continue
        if prev is not None:
            out.append(f"{prev} x{n}" if n > 1 else str(prev))
        prev, n = v, 1
    return ", ".join(out)


def _cmd_batch(args) -> int:
    # Every check that needs no model comes first, before any file is written: a bad job setting
    # is refused at start-up, not turned into an error record per request.
    rank, world = check_world()
    check_scheduler(args.scheduler, args.kv_budget_gb, args.max_rows)
    job = open_job(args.input, args.output, args.batch_size, args.max_new_tokens, shard=(rank, world),
                   inputs={"pruning config": args.pruning})
    check_model_dir(args.model)
    pruning = pruning_spec(args)
    device, dtype = default_device_dtype(args.device, args.dtype)
    if world > 1:  # torchrun: every rank answers its shard into its own part file
        import torch
        import torch.distributed as dist

        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
        if str(device).startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
    engine = LlavaEngine.from_pretrained(args.model, device=device, dtype=dtype, pruning=pruning)
    counts = job.run(engine, progress=not args.no_progress and rank == 0,
                     settings={"model": os.path.realpath(args.model)}, scheduler=args.scheduler,
                     kv_budget_gb=args.kv_budget_gb, max_rows=args.max_rows)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            merge_parts(args.output)
        dist.destroy_process_group()
    print(f"rank {rank}: " if world > 1 else "", end="")
    retry = f" ({counts['retry']} to retry with other settings or later)" if counts["retry"] else ""
    print(f"answered {counts['answered']}, errors {counts['errors']}{retry}, already done {counts['skipped']}, "
          f"{counts['generated_tokens']} tokens in {counts['seconds']:.1f} s "
          f"({counts['answered'] / max(counts['seconds'], 1e-9):.2f} req/s)")
    if counts["internal_errors"]:
        print(f"vtprune: warning: {counts['internal_errors']} request(s) hit an internal error (a bug: traceback "
              f"above); their error records are retried by every re-run", file=sys.stderr)
    return 0


def _cmd_eval(args) -> int:
    prunings = args.pruning or []
    budgets = args.budget or []
    if not args.compare and (len(prunings) > 1 or len(budgets) > 1):
        raise VtpruneError("--pruning and --budget take one value each without --compare")
    if args.compare and args.policy:
        raise VtpruneError("--compare runs every policy; drop --policy")
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise VtpruneError(f"{flag} must be >= 1, got {value}")
    # every path before the data's images are read and the model loads; outputs must not be inputs
    check_model_dir(args.model)
    check_readable(args.data, "eval data")
    for path in prunings:
        check_yaml(path, "pruning config")
    inputs = {"--data file": args.data}
    inputs.update({"--pruning file" + (f" #{i + 1}" if len(prunings) > 1 else ""): p for i, p in enumerate(prunings)})
    if args.predictions:
        check_output_file(args.predictions, "--predictions file", inputs, parents=True)
        inputs["--predictions file"] = args.predictions
    if args.out:
        if args.out.endswith(("/", os.sep)) or os.path.isdir(args.out):
            raise VtpruneError(f"--out {args.out}: is a directory; give a path stem (it writes STEM.json and STEM.md)")
        for path in output_paths(args.out, plot=args.compare).values():
            check_output_file(path, "--out file", inputs, parents=True)
    examples = load_records(args.data)
    if args.limit is not None:
        examples = examples[: args.limit]
    device, dtype = default_device_dtype(args.device, args.dtype)
    engine = LlavaEngine.from_pretrained(args.model, device=device, dtype=dtype)
    kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    if args.compare:
        if not prunings and not budgets:
            raise VtpruneError("--compare needs two-stage configs (--pruning) and/or budgets (--budget)")
        skipped: list = []
        results = run_settings(engine, examples, comparison_settings(engine, prunings, budgets), skipped,
                               predictions_path=args.predictions, **kw)
    else:
        single = argparse.Namespace(pruning=prunings[0] if prunings else None, policy=args.policy,
                                    budget=budgets[0] if budgets else None)
        engine.set_pruning(pruning_spec(single))
        results, skipped = [evaluate(engine, examples, predictions_path=args.predictions, **kw)], []
    meta = {"model": args.model, "data": args.data, "n_records": len(examples), **environment(engine),
            "command": "vtprune " + " ".join(sys.argv[1:]), "skipped": skipped}
    print(to_markdown(results), end="")
    if args.out:
        paths = write_outputs(results, args.out, meta, plot=args.compare)
        print("wrote " + ", ".join(paths.values()))
    return 0


def _cmd_train(args) -> int:
    if not math.isfinite(args.epochs) or args.epochs <= 0:
        raise VtpruneError(f"--epochs must be a finite number > 0, got {args.epochs}")
    # every path before the data's images are read and the model loads; the run's own files
    # (OUT/log.jsonl, pruning.yaml, pruning.safetensors) must not be the config or the data
    check_model_dir(args.model)
    check_yaml(args.config, "pruning config")
    check_readable(args.data, "training data")
    check_output_dir(args.out, "--out directory")
    inputs = {"--config file": args.config, "--data file": args.data}
    for name in ("log.jsonl", "pruning.yaml", "pruning.safetensors"):
        check_output_file(os.path.join(args.out, name), "--out file", inputs, parents=True)
    from .training import Trainer, TrainSettings  # local: importing it may build the compiled ops

    settings = TrainSettings(model=args.model, config=args.config, data=args.data, out=args.out, steps=args.steps,
                             epochs=args.epochs, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                             seed=args.seed, adv_loss=args.adv_loss, save_every=args.save_every,
                             gradient_checkpointing=args.gradient_checkpointing, progress=not args.no_progress)
    trainer = Trainer(settings, resume=args.resume)
    try:
        if trainer.step >= settings.steps:
            print(f"{args.out}: already trained to step {trainer.step} of {settings.steps}")
            return 0
        record = trainer.train()
    finally:
        trainer.close()
    if trainer.rank == 0:
        print(f"trained to step {trainer.step} of {settings.steps}: loss {record['g_loss']:.4f} (task CE "
              f"{record['ce']:.4f}, KL {record['kl']:.4f}), discriminator accuracy {record['d_acc']:.2f}\n"
              f"weights: {args.out}/pruning.safetensors; use them with --pruning {args.out}/pruning.yaml")
    return 0


_COMMANDS = {"generate": _cmd_generate, "batch": _cmd_batch, "train": _cmd_train, "eval": _cmd_eval}


def report_error(prog: str, e: BaseException) -> int | None:
    """Print the one line a user sees for `e` and return the exit status, or None: `e` is a bug
    (the caller re-raises it, traceback and all). main.py shares it."""
    if isinstance(e, VtpruneError):
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if isinstance(e, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    if isinstance(e, OSError):  # a file-system problem the checks at the boundary did not foresee
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{os_error_reason(e)}", file=sys.stderr)
        return 2
    if type(e).__name__ == "OutOfMemoryError":  # the user's sizing problem, not a bug
        print(f"{prog}: error: out of GPU memory ({str(e).splitlines()[0]}); "
              f"use fewer images per call or a smaller dtype", file=sys.stderr)
        return 2
    return None


@contextlib.contextmanager
def one_line_warnings(prog: str):
    """Warnings (skipped data lines, notes) as `PROG: warning: ...`, one line each, no source line."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr if file is None else file)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def import_policy_modules(names) -> None:
    """--policy-module: import each module (its register_policy calls fill the registry)."""
    import importlib

    for name in names or ():
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise VtpruneError(f"--policy-module {name}: cannot import it: {e}") from None


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        with one_line_warnings("vtprune"):
            import_policy_modules(getattr(args, "policy_module", None))
            return _COMMANDS[args.command](args)
    except (Exception, KeyboardInterrupt) as e:
        code = report_error("vtprune", e)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
