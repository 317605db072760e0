"""The kernel dispatcher: auto runs Triton only on CUDA tensors, a forced backend that cannot run says why."""

import os
import subprocess
import sys

import pytest
import torch

from lowmem.kernels import dispatch


def test_auto_runs_the_twins_on_cpu_tensors():
    with dispatch.backend("auto"):
        assert dispatch.use_triton(torch.zeros(3)) is False


def test_forced_torch_runs_the_twins():
    with dispatch.backend("torch"):
        assert dispatch.use_triton(torch.zeros(3)) is False


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    with dispatch.backend("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert dispatch.use_triton(torch.zeros(3)) is True
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="CUDA tensors.*TRITON_INTERPRET=1"):
            dispatch.use_triton(torch.zeros(3))


def test_forced_triton_without_triton_says_how_to_install(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_checked", True)
    monkeypatch.setattr(dispatch, "_triton_error", "ModuleNotFoundError: No module named 'triton'")
    with dispatch.backend("triton"), pytest.raises(RuntimeError, match="pip install triton"):
        dispatch.use_triton(torch.zeros(3))
    with dispatch.backend("auto"):
        assert dispatch.use_triton(torch.zeros(3)) is False


def test_unknown_backend_is_refused_and_the_previous_one_kept():
    before = dispatch.current()
    with pytest.raises(ValueError, match="auto.*triton.*torch"):
        dispatch.set_backend("cuda")
    assert dispatch.current() == before


def test_a_kernel_that_cannot_launch_makes_auto_warn_once_and_use_the_twins(monkeypatch):
    import lowmem.kernels._probe_triton as probe

    pytest.importorskip("triton")
    monkeypatch.setattr(dispatch, "_launch_checked", False)
    monkeypatch.setattr(dispatch, "_launch_error", None)
    monkeypatch.setattr(probe, "probe", lambda device: (_ for _ in ()).throw(RuntimeError("no C compiler")))
    with pytest.warns(RuntimeWarning, match="no C compiler.*torch twins"):
        assert dispatch._launches(torch.device("cpu")) is False
    assert dispatch._launches(torch.device("cpu")) is False  # decided once per process


def test_a_misspelt_backend_fails_at_import():
    done = subprocess.run([sys.executable, "-c", "import lowmem"], env={**os.environ, "LOWMEM_KERNELS": "cuda"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "kernel backend 'cuda' is unknown" in done.stderr
