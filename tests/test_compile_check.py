"""vtprune.kernels.compile_check: Triton kernels compiled for sm_90 on a machine without a GPU.

The whole check (every kernel, dtype and case, ~1.5 min on 2 cores) runs in .ci/run; these tests
check its parts quickly: one real compile down to a cubin with its resource numbers, what the
launchers record, the pass/fail rules and the command's errors."""
import json
import sys

import pytest

from hostile import assert_cli_error, run

pytest.importorskip("triton")
NO_INTERPRET = {"TRITON_INTERPRET": "0"}  # compile_check compiles; the interpreter would not


def test_one_kernel_compiles_for_sm90_with_its_resources(tmp_path):
    out = tmp_path / "cc.json"
    r = run([sys.executable, "-m", "vtprune.kernels.compile_check", "--only", "_gumbel_noise_kernel", "--json",
             str(out)], env=NO_INTERPRET)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 compiled in" in r.stdout and "all ok" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["kernel"], row["dtype"], row["arch"], row["num_warps"]) == ("_gumbel_noise_kernel", "fp32", 90, 4)
    assert 16 <= row["registers"] <= 255 and row["spill_stores"] == 0 and row["spill_loads"] == 0
    assert row["error"] == "" and row["problems"] == []


def test_the_launchers_record_every_kernel_at_the_design_shapes():
    code = ("import json; from vtprune.kernels.compile_check import record_launches, _specialise, _backend\n"
            "out = []\n"
            "for ln in record_launches():\n"
            "    o, sig, const, attrs = _specialise(ln, _backend(90))\n"
            "    names = ln.kernel.arg_names\n"
            "    out.append([ln.kernel.__name__, ln.dtype, o.num_warps, {names[k[0]]: v for k, v in const.items()"
            " if names[k[0]].isupper()}, list(ln.grid)])\n"
            "print(json.dumps(out))")
    r = run([sys.executable, "-c", code], env=NO_INTERPRET)
    assert r.returncode == 0, r.stderr
    launches = json.loads(r.stdout.strip().splitlines()[-1])
    kernels = {(k, dt) for k, dt, *_ in launches}
    for dt in ("fp32", "bf16", "fp16"):  # soft_merge forward and backward in every dtype
        for k in ("_lse_kernel", "_merge_kernel", "_bwd_dx_kernel", "_bwd_dk_kernel", "_bwd_dq_kernel"):
            assert (k, dt) in kernels
    topk_blocks = sorted({c["BLOCK"] for k, _, _, c, _ in launches if k == "_gumbel_topk_kernel"})
    assert topk_blocks == [256, 512, 1024]  # N = 576 (merger), 333 and 245/195 (heads)
    assert len([1 for k, *_ in launches if k == "_gumbel_topk_kernel"]) == 6  # 3 blocks x inference/training
    merge = {dt: (w, c, g) for k, dt, w, c, g in launches if k == "_merge_kernel"}
    assert merge["bf16"] == (4, {"BN": 32, "BM": 32, "BD": 128, "BK": 64, "IEEE": False}, [1, 9, 8])
    assert merge["fp32"] == (8, {"BN": 32, "BM": 32, "BD": 64, "BK": 16, "IEEE": True}, [1, 9, 16])
    dk = {dt: g for k, dt, w, c, g in launches if k == "_bwd_dk_kernel"}
    assert dk["bf16"] == [1, 18, 4] and dk["fp32"] == [1, 18, 8]  # d = 512 in BKO = 128 / 64 columns


def test_spills_and_shared_memory_fail_the_check():
    from vtprune.kernels.compile_check import Row, format_row, judge

    ok = judge(Row("k", "c", "bf16", 90, registers=128, spill_stores=0, spill_loads=0, stack=0, shared=232448))
    assert ok.problems == [] and format_row(ok).endswith("ok")
    spill = judge(Row("k", "c", "bf16", 90, registers=255, spill_stores=8, spill_loads=4, stack=8, shared=0))
    assert spill.problems == ["spills 8/4 B"]
    big = judge(Row("k", "c", "bf16", 80, registers=64, spill_stores=0, spill_loads=0, stack=0, shared=166913))
    assert big.problems == ["shared 166913 B > 166912 B"] and "FAIL shared" in format_row(big)


@pytest.mark.parametrize("args,env,needles", [
    (["--arch", "75"], NO_INTERPRET, ["--arch 75", "unknown compute capability"]),
    (["--only", "no_such_kernel"], NO_INTERPRET, ["--only", "no kernel matches", "_merge_kernel"]),
    ([], {"TRITON_INTERPRET": "1"}, ["TRITON_INTERPRET=1", "unset it"]),
])
def test_bad_arguments(args, env, needles):
    r = run([sys.executable, "-m", "vtprune.kernels.compile_check", *args], env=env)
    assert_cli_error(r, *needles)
