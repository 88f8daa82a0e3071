"""List every place where classification/train.py makes the CPU wait for the GPU (run on a GPU machine).

    python benchmarks/find_syncs.py [train.py flags]

torch's sync debug mode warns at each synchronising call; each distinct place is printed once. Expected:
the print-step read-back in common/engine.py and the once-per-epoch work (validation, EMA, checkpoints).
"""
import os
import runpy
import sys
import warnings

import torch

if __name__ == "__main__":
    torch.cuda.set_sync_debug_mode("warn")
    warnings.simplefilter("default")  # once per place
    sys.argv = ["classification/train.py", *sys.argv[1:]]
    runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), sys.argv[0]),
                   run_name="__main__")
