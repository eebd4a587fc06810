"""Compile every Triton kernel of vtprune for a GPU architecture, on a machine without a GPU.

    python -m vtprune.kernels.compile_check [--arch 90] [--arch 80] [--dtype bf16] [--only NAME] [--json FILE]

Nothing here describes a kernel's arguments by hand: each case runs the op's own launcher
(GumbelTopKFunction, SoftMergeFunction forward and backward, gumbel_noise) on small CPU tensors
of the design's shapes with the kernels' `run` replaced by a recorder, so what is compiled is
exactly what the launcher would launch: its block sizes, num_warps, constexprs, and the
specialisation Triton itself derives from the arguments (16-byte-aligned pointers and integers
divisible by 16 get `tt.divisibility`, integers equal to 1 become constants). Each recorded
launch is then compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
warp_size))`, which needs no driver, down to a cubin; `cuobjdump --dump-resource-usage` (shipped in
Triton's wheel) reads its registers, stack and static shared memory, and ptxas' own `-v` log its
spill stores and loads.

The design's shapes (configs/vision_token_pruning.yaml on LLaVA-1.5-7B): the merger scores N = 576
visual tokens and merges them into M = 288 (x = CLIP ViT-L features, D = 1024; keys/queries
pruner_d_internal = 512); the pruner heads' top-k runs over the whole sequence of a row, merged
visual tokens plus 45 text tokens: 333, then 245, then 195 tokens. Dtypes: the engine runs fp32,
bf16 or fp16 activations; training runs the same dtypes under autocast, backward included.
gumbel_topk only ever sees fp32 logits (the merger and heads return `.float()` logits and the
baselines cast their scores), so it is compiled in fp32.

Exit status: 0 when every kernel compiles without register spills and within the architecture's
shared memory; 1 otherwise (the table says which); 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from ..errors import VtpruneError
from ..files import check_output_file

# shared memory a block may use (opt-in maximum, bytes): CUDA C Programming Guide, "Technical
# Specifications per Compute Capability" (8.0: 163 KB, 8.6/8.9: 99 KB, 9.0: 227 KB, 10.0/12.0: 227/99 KB)
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DTYPES = ("fp32", "bf16", "fp16")
N_VISUAL, M_MERGED, D_VISION, D_INTERNAL = 576, 288, 1024, 512
HEAD_SEQUENCES = (45 + 288, 45 + 200, 45 + 150)  # text + visual tokens entering each pruning layer


@dataclass
class Launch:
    case: str
    dtype: str
    kernel: object            # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


@dataclass
class Row:
    kernel: str
    case: str
    dtype: str
    arch: int
    num_warps: int = 0
    num_stages: int = 0
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    compile_s: float = 0.0
    error: str = ""
    problems: list = field(default_factory=list)


# ----------------------------------------------------------------------------- recording launches
def _modules():
    return (importlib.import_module("vtprune.kernels.gumbel_topk"), importlib.import_module("vtprune.kernels.soft_merge"))


def kernels() -> dict:
    """Every @triton.jit kernel of the package (helpers called from kernels excluded: they are
    compiled inside their callers), by name."""
    from triton.runtime.jit import JITFunction

    found = {}
    for mod in _modules():
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                found[name] = obj
    return found


@contextlib.contextmanager
def _recording(out: list, case: str, dtype: str):
    ks = kernels()

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            out.append(Launch(case, dtype, kernel, args, kwargs, grid))
        return run

    for k in ks.values():
        k.run = recorder(k)
    try:
        yield
    finally:
        for k in ks.values():
            del k.run  # back to the class's method


def record_launches(dtypes=DTYPES) -> list[Launch]:
    """Run every launcher at the design's shapes with recording kernels."""
    import torch

    gt, sm = _modules()
    launches: list[Launch] = []
    with torch.no_grad():
        with _recording(launches, "noise N=576", "fp32"):
            gt.gumbel_noise((1, N_VISUAL), 0, "cpu", triton_path=True)
        cases = [("merger N=576 k=288", N_VISUAL, M_MERGED)]
        cases += [(f"head N={n} k={k}", n, k) for n, k in zip(HEAD_SEQUENCES, (200, 150, 100))]
        for name, n, k in cases:
            for noise in (False, True):  # inference / training
                logits = torch.randn(1, n)
                with _recording(launches, f"{name} {'train' if noise else 'infer'}", "fp32"):
                    gt.GumbelTopKFunction.apply(logits, None, k, 0.1, noise, 12345)
    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for dt in dtypes:
        x = torch.randn(1, N_VISUAL, D_VISION, dtype=tdt[dt], requires_grad=True)
        keys = torch.randn(1, N_VISUAL, D_INTERNAL, dtype=tdt[dt], requires_grad=True)
        queries = torch.randn(1, M_MERGED, D_INTERNAL, dtype=tdt[dt], requires_grad=True)
        with _recording(launches, f"merge {N_VISUAL}->{M_MERGED} D={D_VISION} d={D_INTERNAL}", dt):
            out, _sizes = sm.SoftMergeFunction.apply(x, keys, queries, 0.1)
            out.float().sum().backward()
    return _dedupe(launches)


def _dedupe(launches: list[Launch]) -> list[Launch]:
    """One launch per distinct compilation (kernel, specialisation, options), first case kept."""
    seen, kept = set(), []
    for ln in launches:
        key = (ln.kernel.__name__, ln.dtype, repr(_specialise(ln, _backend(90))[1:]))
        if key not in seen:
            seen.add(key)
            kept.append(ln)
    return kept


# ----------------------------------------------------------------------------- compiling
def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    return target, make_backend(target)


def _specialise(ln: Launch, target_backend):
    """(options, signature, constexprs, attrs) exactly as JITFunction.run derives them."""
    from triton.runtime.jit import create_function_from_signature

    _target, backend = target_backend
    k = ln.kernel
    binder = create_function_from_signature(k.signature, k.params, backend)
    kwargs = dict(ln.kwargs, debug=False)
    bound, specialization, options = binder(*ln.args, **kwargs)
    return k._pack_args(backend, kwargs, bound, specialization, options)


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.isfile(path) else name


_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack, static shared and local memory of the cubin's function (cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True)
    finally:
        os.unlink(f.name)
    m = _RESOURCE.search(res.stdout)
    if not m:
        raise RuntimeError(f"cuobjdump printed no resource usage: {res.stdout.strip()[:200]}")
    reg, stack, shared, local = (int(v) for v in m.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


def compile_one(ln: Launch, arch: int) -> Row:
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    row = Row(ln.kernel.__name__, ln.case, ln.dtype, arch)
    target_backend = _backend(arch)
    try:
        options, signature, constexprs, attrs = _specialise(ln, target_backend)
        row.num_warps, row.num_stages = options.num_warps, options.num_stages
        log = io.StringIO()
        t = time.perf_counter()
        old = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v's log is printed: spill stores / loads
        try:
            with contextlib.redirect_stdout(log):
                ck = triton.compile(ASTSource(ln.kernel, signature, constexprs, attrs), target=target_backend[0],
                                    options=options.__dict__)
        finally:
            knobs.nvidia.dump_ptxas_log = old
        row.compile_s = time.perf_counter() - t
        usage = resource_usage(ck.asm["cubin"])
        row.registers, row.stack = usage["registers"], usage["stack"]
        row.shared = int(ck.metadata.shared) + usage["static_shared"]
        spills = _PTXAS_SPILL.findall(log.getvalue())
        if spills:
            row.spill_stores = sum(int(s) for s, _ in spills)
            row.spill_loads = sum(int(v) for _, v in spills)
        else:  # no log (another Triton): local memory is where spills go
            row.spill_stores = row.spill_loads = usage["local"]
    except Exception as e:  # a compile error is a result, reported in the table
        lines = [ln_ for ln_ in str(e).strip().splitlines() if ln_.strip()]
        row.error = f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]
        row.problems.append("compile error")
        return row
    return judge(row)


def judge(row: Row) -> Row:
    """Adds what fails the check: register spills, shared memory over the architecture's limit."""
    if row.spill_stores or row.spill_loads:
        row.problems.append(f"spills {row.spill_stores}/{row.spill_loads} B")
    limit = SHARED_LIMIT[row.arch]
    if row.shared is not None and row.shared > limit:
        row.problems.append(f"shared {row.shared} B > {limit} B")
    return row


# ----------------------------------------------------------------------------- output
_HEADER = f"{'kernel':<22} {'case':<34} {'dtype':<5} {'arch':>4} {'warps':>5} {'regs':>4} {'spills':>7} " \
          f"{'stack':>5} {'smem B':>7} {'compile s':>9}  status"


def format_row(r: Row) -> str:
    if r.error:
        return f"{r.kernel:<22} {r.case:<34} {r.dtype:<5} {r.arch:>4} {r.num_warps:>5} {'-':>4} {'-':>7} {'-':>5} " \
               f"{'-':>7} {r.compile_s:>9.1f}  FAIL {r.error}"
    spills = f"{r.spill_stores}/{r.spill_loads}"
    status = "ok" if not r.problems else "FAIL " + "; ".join(r.problems)
    return f"{r.kernel:<22} {r.case:<34} {r.dtype:<5} {r.arch:>4} {r.num_warps:>5} {r.registers:>4} {spills:>7} " \
           f"{r.stack:>5} {r.shared:>7} {r.compile_s:>9.1f}  {status}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtprune.kernels.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", help="compute capability x10 (repeatable; default 90)")
    p.add_argument("--dtype", action="append", choices=DTYPES, help="soft_merge dtypes (repeatable; default all)")
    p.add_argument("--only", action="append", help="compile only kernels whose name contains this (repeatable)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    archs = args.arch or [90]

    def fail(msg: str) -> int:  # bad arguments: one line, exit 2 (the project's CLI convention)
        print(f"{p.prog}: error: {msg}", file=sys.stderr)
        return 2
    for a in archs:
        if a not in SHARED_LIMIT:
            return fail(f"--arch {a}: unknown compute capability (known: {', '.join(map(str, sorted(SHARED_LIMIT)))})")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return fail("TRITON_INTERPRET=1 is set: the kernels are then interpreted, not compiled; unset it")
    try:
        import triton
    except ImportError:
        return fail("triton is not installed")
    if args.only and not any(s in name for s in args.only for name in kernels()):
        return fail(f"--only {' '.join(args.only)}: no kernel matches (kernels: {', '.join(sorted(kernels()))})")
    if args.json:
        try:
            check_output_file(args.json, "--json")
        except VtpruneError as e:
            return fail(str(e))

    launches = record_launches(tuple(args.dtype or DTYPES))
    if args.only:
        launches = [ln for ln in launches if any(s in ln.kernel.__name__ for s in args.only)]
    print(f"triton {triton.__version__}: {len(launches)} launches x {len(archs)} arch(s), compiled one at a time",
          flush=True)
    print(_HEADER, flush=True)
    rows, t0 = [], time.perf_counter()
    old_cache = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="vtprune-compile-check-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # compile every time: a cached cubin would hide a regression
        try:
            for arch in archs:
                for ln in launches:
                    r = compile_one(ln, arch)
                    rows.append(r)
                    print(format_row(r), flush=True)
        finally:
            if old_cache is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = old_cache
    failed = [r for r in rows if r.problems]
    print(f"{len(rows)} compiled in {time.perf_counter() - t0:.0f} s: "
          f"{'all ok' if not failed else f'{len(failed)} FAILED'}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"triton": triton.__version__, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
