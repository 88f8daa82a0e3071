"""Deployment export: TorchScript, or ONNX through torch.export, with dynamic shapes, checked against the eager
model, plus a Triton Inference Server model repository."""
import os
import shutil
import warnings

import torch
from torch import nn
from torch.export import Dim

from common.log import UserError, print0
from common.output_dir import check_destination


def add_export_args(parser):
    add = parser.add_argument
    add("--export", choices=["torchscript", "onnx"], help="instead of evaluating, write the model (fp32, eval mode, "
        "dynamic batch; segmentation: dynamic height and width) to --export-path, checked against the eager model")
    add("--export-path", metavar="FILE", help="where --export writes, e.g. model.onnx or model.pt")
    add("--export-rtol", type=float, default=1e-4, metavar="TOL", help="fail when max|exported - eager| / "
        "max|eager| on the first validation batch exceeds TOL (default: 1e-4, for fp32)")
    add("--export-triton", metavar="DIR", help="with --export onnx: also write the Triton model repository "
        "DIR/<model>/config.pbtxt, DIR/<model>/1/model.onnx")


def export_requested(export, export_path, export_triton):
    """Whether to export instead of evaluating (the --export, --export-path and --export-triton values);
    refuses export flags that do not fit, and destinations that cannot be written, before any work."""
    if not (export or export_path or export_triton):
        return False
    if not (export and export_path):
        raise UserError("give --export torchscript|onnx together with --export-path FILE")
    if export_triton and export != "onnx":
        raise UserError("--export-triton serves an ONNX model: use it with --export onnx")
    check_destination("--export-path", export_path)
    if export_triton:
        check_destination("--export-triton", export_triton, folder=True)
    if export == "onnx":
        try:  # the exporter would fail only after the export has begun, with a long traceback
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise UserError("--export onnx needs onnx and onnxscript: pip install -r requirements-export.txt") from None
    return True


class Logits(nn.Sequential):
    """The model's logits tensor alone: runtimes take no dict such as a segmenter's {"out": ..., "aux": ...}."""

    def forward(self, images):
        out = self[0](images)
        return out["out"] if isinstance(out, dict) else out


def parity_inputs(images, size_divisor):
    """(batch to export with, batch to check on): the check runs at another batch size and, when height and
    width are dynamic (size_divisor not None), at another size, so that it proves the dynamic dimensions too."""
    images = images.as_subclass(torch.Tensor).float().cpu()
    while len(images) < 3:  # real segmentation data comes one image per batch
        images = torch.cat([images, images.flip(-1)])
    if size_divisor is None:
        return images[:2], images
    height, width = (side - side % size_divisor for side in images.shape[-2:])
    step = size_divisor if min(height, width) >= 2 * size_divisor else 0
    return images[:2, :, :height, :width], images[:, :, :height - step, :width - step]


def save_torchscript(model, example, path):
    # Tracing, not scripting: torchvision's ResNet forward uses the avgpool and fc that DeepLabV3+ deletes.
    # Recent PyTorch deprecates TorchScript (the README says why it is still offered), and the tracer warns of
    # shape checks it freezes (UNet's): the parity check at other shapes tests what the trace does instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.save(torch.jit.trace(model, example, check_trace=False), path)
        return torch.jit.load(path)


def save_onnx(model, example, path, size_divisor):
    def side(name):  # a dimension in multiples of the divisor, as UNet needs
        return Dim(name) if size_divisor == 1 else size_divisor * Dim(f"{name}_div{size_divisor}")

    dims = {0: Dim("batch")} if size_divisor is None else {0: Dim("batch"), 2: side("height"), 3: side("width")}
    try:
        torch.onnx.export(model, (example,), path, dynamo=True, dynamic_shapes=(dims,), input_names=["images"],
                          output_names=["logits"], external_data=False, verbose=False)  # one file, weights inside
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"--export onnx failed ({type(e).__name__}: {first_line}): try --export torchscript") from e


def onnxruntime_runner(path):
    """A function that runs the ONNX file on a batch, or None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        print0("onnxruntime is not installed, so the ONNX model is not checked: pip install -r requirements-export.txt")
        return None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def check_parity(expected, actual, rtol):
    abs_diff = (actual - expected).abs().max().item()
    rel_diff = abs_diff / max(expected.abs().max().item(), 1e-12)
    print0(f"parity: max abs diff {abs_diff:.3g}, max rel diff {rel_diff:.3g} (tolerance {rtol:g})")
    if not rel_diff <= rtol:  # also refuses NaN
        raise UserError(f"the exported model differs from the eager one by {rel_diff:.3g} relative, more than "
                        f"--export-rtol {rtol:g}: do not deploy it; raise --export-rtol only if that is acceptable")


def write_triton_repository(onnx_path, repo_dir, name):
    import onnx

    model_dir = os.path.join(repo_dir, name)
    os.makedirs(os.path.join(model_dir, "1"), exist_ok=True)
    shutil.copyfile(onnx_path, os.path.join(model_dir, "1", "model.onnx"))
    graph = onnx.load(onnx_path).graph
    with open(os.path.join(model_dir, "config.pbtxt"), "w") as f:
        # max_batch_size 0: no batching by Triton, so every dims lists the batch too, -1 like the other dynamic ones
        f.write(f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n')
        for kind, values in (("input", graph.input), ("output", graph.output)):
            for v in values:
                dims = [str(d.dim_value) if d.HasField("dim_value") else "-1" for d in v.type.tensor_type.shape.dim]
                f.write(f'{kind} [ {{ name: "{v.name}", data_type: TYPE_FP32, dims: [ {", ".join(dims)} ] }} ]\n')
    print0(f"wrote the Triton model repository {model_dir}")


def export_model(model, loader, fmt, path, rtol, triton_dir=None, name="model", size_divisor=None):
    """Export as `fmt` (torchscript or onnx) to `path`, checked on the first batch of `loader` to `rtol`, and
    write a Triton repository for it under `triton_dir` as `name`. size_divisor None keeps height and width
    fixed (a classifier); else they are dynamic, in multiples of it."""
    model = Logits(model.to("cpu", memory_format=torch.contiguous_format).float()).eval()
    example, batch = parity_inputs(next(iter(loader))[0], size_divisor)
    with torch.no_grad():
        if fmt == "torchscript":
            exported = save_torchscript(model, example, path)
        else:
            save_onnx(model, example, path, size_divisor)
            exported = onnxruntime_runner(path)
        print0(f"exported {path} from a batch of shape {tuple(example.shape)}; parity check on {tuple(batch.shape)}")
        if exported is not None:
            check_parity(model(batch), exported(batch), rtol)
    if triton_dir:
        write_triton_repository(path, triton_dir, name)
