"""What this machine offers PyTorch: versions, GPUs, and whether bf16 and torch.compile work.

    python tools/check_env.py                 # the report; exit 1 if bf16 or torch.compile fails
    python tools/check_env.py --expect-cuda   # also exit 1, saying why, when no CUDA GPU is usable
    python tools/check_env.py --skip-compile  # without the torch.compile check (seconds faster)

Runs anywhere torch is installed (a laptop, a cluster node, the Docker image). The last line is "ok" or
starts with "error:", so a job script can run it first and stop early on a broken node.
"""
import argparse
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

# Where CUDA builds come from when the installed torch has none; the Docker image uses the same index.
CUDA_WHEEL_INDEX = "https://download.pytorch.org/whl/cu128"
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--expect-cuda", action="store_true",
                        help="fail (exit 1) with the reason when no CUDA GPU is usable")
    parser.add_argument("--skip-compile", action="store_true",
                        help="leave out the torch.compile check, which compiles a small function")
    return parser


def line(name, value):
    print(f"{name:<24}{value}")


def nvidia_driver_version():
    """The NVIDIA kernel driver's version, or None where none is loaded or visible (a container without
    --gpus sees neither the /proc file nor nvidia-smi)."""
    try:
        # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.124.06  Wed Feb 26 ..."
        words = DRIVER_VERSION_FILE.read_text().split()
        if "Module" in words:
            return words[words.index("Module") + 1]
    except OSError:
        pass
    try:
        output = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return output[0] if output else None


def cuda_available(torch):
    """torch.cuda.is_available() and the warning torch gives when it is False for a reason (an old driver)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    return available, "; ".join(str(w.message).strip() for w in caught)


def why_no_cuda(torch, driver, warning):
    if torch.version.cuda is None:
        return (f"this torch is a CPU-only build ({torch.__version__}): install a CUDA build, for example "
                f"pip install torch --index-url {CUDA_WHEEL_INDEX}")
    if driver is None and not warning:
        return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, but no NVIDIA driver is "
                f"loaded (neither {DRIVER_VERSION_FILE} nor nvidia-smi): install the driver, or in Docker start "
                "the container with --gpus all")
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None and torch.cuda.device_count() == 0:
        return f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides every GPU"
    return (f"torch.cuda.is_available() is False with driver {driver or 'unknown'} and torch built for CUDA "
            f"{torch.version.cuda}" + (f": {warning}" if warning else ""))


def check_bf16(torch, device):
    """Runs a bf16 matrix product on the device; returns (works, description)."""
    try:
        a = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
        result = (a @ a).float()
        if not torch.isfinite(result).all():
            return False, f"a bf16 matmul on {device} gave non-finite values"
    except Exception as error:  # noqa: BLE001 - any failure is the answer
        return False, f"a bf16 matmul on {device} failed: {first_line(error)}"
    if device == "cuda":
        native = torch.cuda.get_device_capability(0) >= (8, 0)
        return True, f"works on {device} ({'native' if native else 'emulated: compute capability below 8.0'})"
    return True, f"works on {device}"


def check_compile(torch, device):
    """Compiles a small function with the default backend (Inductor) and compares it with eager."""
    def function(x):
        return torch.sin(x) * 2 + torch.cos(x)

    start = time.perf_counter()
    try:
        x = torch.randn(1024, device=device)
        compiled = torch.compile(function)(x)
        if not torch.allclose(compiled, function(x), atol=1e-5):
            return False, f"compiled and eager results differ on {device}"
    except Exception as error:  # noqa: BLE001 - any failure is the answer
        return False, (f"failed on {device}: {first_line(error)} (torch.compile needs a C compiler and the "
                       "Python headers: gcc, g++, python3-dev)")
    return True, f"works on {device} ({time.perf_counter() - start:.1f} s for the first compilation)"


def first_line(error):
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    line("python", f"{platform.python_version()} ({sys.executable})")
    try:
        import torch
    except ImportError as error:
        print(f"error: cannot import torch ({error}): pip install -r requirements.txt", file=sys.stderr)
        return 1

    driver = nvidia_driver_version()
    available, warning = cuda_available(torch)
    line("torch", torch.__version__)
    line("CUDA (torch built for)", torch.version.cuda or "none: CPU-only build")
    line("cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none")
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001 - CPU builds have no NCCL bindings at all
        nccl = "none"
    line("NCCL", nccl)
    line("NVIDIA driver", driver or ("not found, although CUDA works" if available else "none loaded"))
    line("cuda.is_available()", available)
    failures = []
    if available:
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            line(f"GPU {index}", f"{properties.name}, {properties.total_memory / 2**30:.1f} GiB, "
                                 f"compute capability {properties.major}.{properties.minor}")
    else:
        reason = why_no_cuda(torch, driver, warning)
        line("GPUs", f"none ({reason})")
        if args.expect_cuda:
            failures.append(f"CUDA was expected: {reason}")

    device = "cuda" if available else "cpu"
    works, description = check_bf16(torch, device)
    line("bf16", description)
    if not works:
        failures.append(f"bf16: {description}")
    if args.skip_compile:
        line("torch.compile", "not checked (--skip-compile)")
    else:
        works, description = check_compile(torch, device)
        line("torch.compile", description)
        if not works:
            failures.append(f"torch.compile {description}")

    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    if not failures:
        print("ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
