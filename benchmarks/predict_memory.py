"""Peak host memory of segmentation/predict.py on one large image in sliding windows on the CPU (issue 31): the
windows' sums are kept a band of rows at a time, where the class scores of the whole image would take
classes x 4 bytes a pixel (19 classes at 6000x4000: 1.8 GB), and the image at its size besides.

    OMP_NUM_THREADS=1 python benchmarks/predict_memory.py --out predict_memory.json   # 6000x4000, DeepLabV3+ R-50
    python benchmarks/predict_memory.py --size 1200 800 --model unet                  # a minute

A checkpoint of random weights (memory does not depend on them) with the given model, classes and window is
written to --work, with a textured JPEG of --size; segmentation/predict.py then predicts the image in a child
process (--eval-mode slide, --base-size 0: at its own size, -j 0), whose peak resident set size getrusage reads
once it has ended. Output stride 16 by default: at 8 each window costs about three times the computation.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.report import environment, write_json
from segmentation.datasets import voc_colour
from segmentation.inference import window_starts
from segmentation.model import create_model


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=[6000, 4000], metavar=("WIDTH", "HEIGHT"))
    p.add_argument("--model", default="deeplabv3plus_resnet50")
    p.add_argument("--output-stride", type=int, default=16, choices=[8, 16])
    p.add_argument("--classes", type=int, default=19, help="19, as Cityscapes")
    p.add_argument("--window", type=int, default=512, help="--eval-crop; the stride is 2/3 of it")
    p.add_argument("--work", help="folder for the image, checkpoint and predictions (default: a temporary one)")
    p.add_argument("--out", help="write the result as JSON here")
    return p


def write_inputs(work, args):
    generator = torch.Generator().manual_seed(0)
    width, height = args.size
    blocks = torch.randint(0, 256, (1, 3, height // 200 + 2, width // 200 + 2), generator=generator).float()
    image = F.interpolate(blocks, size=(height, width), mode="bilinear").to(torch.uint8)[0]
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(work, "scan.jpg"), quality=90)
    model = create_model(args.model, args.classes, args.output_stride, unet_width=64)
    trained = {"model": args.model, "output_stride": args.output_stride, "aux_loss": False, "unet_width": 64,
               "crop_size": [args.window, args.window], "base_size": min(args.size)}
    torch.save({"model": model.state_dict(), "args": trained, "class_names": [f"class {i}" for i in
                range(args.classes)], "palette": [voc_colour(i) for i in range(args.classes)]},
               os.path.join(work, "random.pth"))


def main(args):
    work = args.work or tempfile.mkdtemp(prefix="predict-memory-")
    os.makedirs(work, exist_ok=True)
    write_inputs(work, args)
    command = [sys.executable, os.path.join(ROOT, "segmentation", "predict.py"), "--checkpoint",
               os.path.join(work, "random.pth"), os.path.join(work, "scan.jpg"), "-o", os.path.join(work, "out"),
               "--device", "cpu", "-j", "0", "--eval-mode", "slide", "--base-size", "0"]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    done = subprocess.run(command)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"segmentation/predict.py failed with exit status {done.returncode}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    width, height = args.size
    stride = 2 * args.window // 3
    windows = len(window_starts(height, args.window, stride)) * len(window_starts(width, args.window, stride))
    result = {"image": f"{width}x{height}", "model": args.model, "output_stride": args.output_stride,
              "classes": args.classes, "window": args.window, "stride": stride, "windows": windows,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "seconds": round(seconds, 1),
              "peak_rss_gib": round(peak / 2**30, 3),
              "full_size_scores_gib": round(args.classes * width * height * 4 / 2**30, 3),
              "mask": os.path.join(work, "out", "masks", "scan.png"), **environment(torch.device("cpu"))}
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
