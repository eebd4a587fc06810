"""The JIT build of the compiled ops never waits forever: builds of one directory are serialized by
an flock (released by the kernel when its holder dies), and torch's own `lock` file, which a
killed build leaves behind and which would block every later process, is removed by the holder."""
import fcntl
import os

import pytest

from vtprune.kernels import _extension


def test_a_stale_torch_lock_is_removed_by_the_flock_holder(tmp_path):
    (tmp_path / "lock").write_text("")  # what a build killed with SIGKILL leaves
    with _extension._build_lock(str(tmp_path)):
        assert not (tmp_path / "lock").exists()
    with _extension._build_lock(str(tmp_path)):  # released: taken again at once
        pass


def test_a_live_build_is_waited_for_then_given_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_extension, "BUILD_WAIT_S", 2.5)
    with open(tmp_path / "vtprune.flock", "a") as held:  # another process's build in progress
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        (tmp_path / "lock").write_text("")
        with pytest.raises(TimeoutError, match="another process has been building"):
            with _extension._build_lock(str(tmp_path)):
                pass
        assert (tmp_path / "lock").exists()  # a live build's lock is left alone
    assert "waiting for another process's build" in capsys.readouterr().err


def test_build_directories_differ_per_checkout(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setenv("VTPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(_extension, "_build_lock", lambda d: seen.append(d) or open(os.devnull))

    def fake_load(**kw):
        raise RuntimeError("stop here")
    import torch.utils.cpp_extension as ce
    monkeypatch.setattr(ce, "load", fake_load)
    for csrc in (_extension._CSRC, str(tmp_path / "other" / "csrc")):
        if csrc != _extension._CSRC:
            os.makedirs(csrc)
            for name in ("ops.cpp", "compact.h", "compact.cu"):
                with open(os.path.join(_extension._CSRC, name), "rb") as f, open(os.path.join(csrc, name), "wb") as g:
                    g.write(f.read())
        monkeypatch.setattr(_extension, "_CSRC", csrc)
        with pytest.raises(RuntimeError, match="stop here"):
            _extension._jit_build()
    assert len(seen) == 2 and seen[0] != seen[1]
