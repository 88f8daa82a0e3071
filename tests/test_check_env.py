"""tools/check_env.py: the report on this machine, and each reason it gives for a missing CUDA."""
import importlib.util
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import ROOT

# Loaded from its path: tools/ is a folder of scripts, not a package, and an installed package named
# "tools" would win over a namespace import.
_spec = importlib.util.spec_from_file_location("check_env", ROOT / "tools" / "check_env.py")
check_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_env)

no_gpu_here = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable CUDA GPU")


def run_script(*flags):
    return subprocess.run([sys.executable, ROOT / "tools" / "check_env.py", *flags], capture_output=True,
                          text=True, timeout=1800)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler, which torch.compile on the CPU needs")
def test_report_with_bf16_and_compile():
    result = run_script()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "ok"
    report = {line[:24].strip(): line[24:] for line in lines[:-1]}
    assert report["torch"] == torch.__version__
    assert report["CUDA (torch built for)"] == (torch.version.cuda or "none: CPU-only build")
    assert report["cuda.is_available()"] == str(torch.cuda.is_available())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert report["bf16"].startswith(f"works on {device}")
    assert report["torch.compile"].startswith(f"works on {device} (")
    assert {"python", "cuDNN", "NCCL", "NVIDIA driver"} <= set(report)


@no_gpu_here
def test_expect_cuda_fails_with_the_reason():
    result = run_script("--expect-cuda", "--skip-compile")
    assert result.returncode == 1
    (error,) = result.stderr.strip().splitlines()[-1:]
    assert error.startswith("error: CUDA was expected: ")
    assert "--gpus all" in error or "CPU-only build" in error
    assert "ok" not in result.stdout.splitlines()
    assert "torch.compile           not checked (--skip-compile)" in result.stdout


def test_cpu_only_build_names_the_cuda_wheel_index(monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_env.main(["--expect-cuda", "--skip-compile"]) == 1
    error = capsys.readouterr().err
    assert "is a CPU-only build" in error and check_env.CUDA_WHEEL_INDEX in error


def test_old_driver_reason_comes_from_torch(monkeypatch, capsys):
    def is_available():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040)")
        return False

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(check_env, "nvidia_driver_version", lambda: "470.82.01")
    assert check_env.main(["--skip-compile"]) == 0  # nothing was expected: a report, not a failure
    assert check_env.main(["--expect-cuda", "--skip-compile"]) == 1
    error = capsys.readouterr().err
    assert "driver 470.82.01" in error and "is too old" in error


def test_a_failing_compile_fails_the_check(monkeypatch, capsys):
    def broken_compile(function, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken_compile)
    assert check_env.main([]) == 1
    output = capsys.readouterr()
    assert "error: torch.compile failed on" in output.err and "No working C++ compiler" in output.err
    assert "gcc, g++, python3-dev" in output.out
