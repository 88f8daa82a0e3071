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
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__.strip() + "\n\nEvery flag goes to classification/train.py: see its --help.")
        sys.exit(0)
    if not torch.cuda.is_available():  # the sync debug mode itself needs a driver, and would die in a traceback
        print("error: find_syncs.py reports where the CPU waits for a CUDA GPU, and torch sees none here",
              file=sys.stderr)
        sys.exit(2)
    torch.cuda.set_sync_debug_mode("warn")
    warnings.simplefilter("default")  # once per place
    sys.argv = ["classification/train.py", *sys.argv[1:]]
    runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), sys.argv[0]),
                   run_name="__main__")
