"""Deployment export from both eval scripts: TorchScript and ONNX, parity with the eager model at other batch sizes
and image sizes than exported at, EMA weights, the Triton repository, and the messages for what a user can fix."""
import re
import sys

import onnxruntime
import pytest
import torch

from classification.eval import get_args_parser as classification_parser
from classification.model import create_model as create_classifier
from common.export import check_parity, parity_inputs
from common.log import UserError
from conftest import SEG_TINY, TINY, evaluate, evaluate_segmentation, train, train_segmentation
from segmentation.eval import get_args_parser as segmentation_parser
from segmentation.model import create_model as create_segmenter

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load: TorchScript is deprecated

RTOL = 1e-4


@pytest.fixture(scope="module")
def classifier_checkpoint(tmp_path_factory):
    """resnet18 after a few steps on 32-pixel synthetic images, with EMA weights that differ from the model's."""
    out = tmp_path_factory.mktemp("classifier")
    train(*TINY, "--synthetic-train-size", "64", "--synthetic-val-size", "8", "--model-ema", "--model-ema-steps", "1",
          "--model-ema-decay", "0.99", "--lr-warmup-epochs", "0", "--output-dir", out)
    return out / "checkpoint.pth"


@pytest.fixture(scope="module")
def segmenter_checkpoints(tmp_path_factory):
    """UNet (width 8) and DeepLabV3+ (output stride 16) after a few steps on 32-pixel synthetic scenes."""
    paths = {}
    for name in ("unet", "deeplabv3plus_resnet50"):
        out = tmp_path_factory.mktemp(name)
        train_segmentation(*SEG_TINY, "--model", name, "--output-stride", "16", "--synthetic-train-size", "16",
                           "--synthetic-val-size", "8", "-b", "8", "--output-dir", out)
        paths[name] = out / "checkpoint.pth"
    return paths


def eager(create, state):
    model = create()
    model.load_state_dict(state)
    return model.eval()


def relative_difference(expected, actual):
    return (torch.as_tensor(actual) - expected).abs().max().item() / expected.abs().max().item()


def run_onnx(path, images):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})[0]


def triton_config(path):
    """{tensor name: dims} and the header fields of a config.pbtxt as export writes it."""
    text = path.read_text()
    tensors = {name: [int(d) for d in dims.split(",")] for name, dims in
               re.findall(r'name: "(\w+)", data_type: TYPE_FP32, dims: \[ ([-\d, ]+) \]', text)}
    return tensors, dict(re.findall(r'^(name|platform|max_batch_size): "?([\w.]+)"?$', text, re.MULTILINE))


def test_torchscript_classifier_holds_the_ema_weights_and_takes_any_batch(classifier_checkpoint, tmp_path, capsys):
    evaluate("--checkpoint", classifier_checkpoint, "--use-ema", "--device", "cpu", "-b", "4",
             "--export", "torchscript", "--export-path", tmp_path / "model.pt")
    assert "max rel diff" in capsys.readouterr().out
    checkpoint = torch.load(classifier_checkpoint, weights_only=True)
    ema = eager(lambda: create_classifier("resnet18", None, 10)[0], checkpoint["model_ema"])
    plain = eager(lambda: create_classifier("resnet18", None, 10)[0], checkpoint["model"])
    exported = torch.jit.load(tmp_path / "model.pt")
    images = torch.randn(3, 3, 32, 32)  # exported at batch 2
    with torch.no_grad():
        assert relative_difference(ema(images), exported(images)) <= RTOL
        assert relative_difference(plain(images), exported(images)) > 1e-3


def test_onnx_classifier_and_its_triton_repository(classifier_checkpoint, tmp_path):
    evaluate("--checkpoint", classifier_checkpoint, "--device", "cpu", "-b", "4", "--export", "onnx",
             "--export-path", tmp_path / "model.onnx", "--export-triton", tmp_path / "triton")
    checkpoint = torch.load(classifier_checkpoint, weights_only=True)
    model = eager(lambda: create_classifier("resnet18", None, 10)[0], checkpoint["model"])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert relative_difference(model(images), run_onnx(tmp_path / "model.onnx", images)) <= RTOL
    served = tmp_path / "triton" / "resnet18"
    assert (served / "1" / "model.onnx").read_bytes() == (tmp_path / "model.onnx").read_bytes()
    tensors, header = triton_config(served / "config.pbtxt")
    assert header == {"name": "resnet18", "platform": "onnxruntime_onnx", "max_batch_size": "0"}
    assert tensors == {"images": [-1, 3, 32, 32], "logits": [-1, 10]}


@pytest.mark.parametrize("export", ["torchscript", "onnx"])
@pytest.mark.parametrize("name", ["unet", "deeplabv3plus_resnet50"])
def test_segmenter_export_takes_other_batch_sizes_and_image_sizes(segmenter_checkpoints, tmp_path, name, export):
    path = tmp_path / f"model.{'pt' if export == 'torchscript' else 'onnx'}"
    triton = ("--export-triton", tmp_path / "triton") if export == "onnx" else ()
    evaluate_segmentation("--checkpoint", segmenter_checkpoints[name], "--device", "cpu", "-b", "4",
                          "--export", export, "--export-path", path, *triton)
    checkpoint = torch.load(segmenter_checkpoints[name], weights_only=True)
    model = eager(lambda: create_segmenter(name, 3, 16, unet_width=8), checkpoint["model"])
    images = torch.randn(3, 3, 48, 64)  # exported at 2 x 3 x 32 x 32; UNet takes multiples of 16
    with torch.no_grad():
        expected = model(images)["out"]
        actual = torch.jit.load(path)(images) if export == "torchscript" else run_onnx(path, images)
    assert actual.shape == expected.shape == (3, 3, 48, 64)
    assert relative_difference(expected, actual) <= RTOL
    if export == "onnx":
        tensors, header = triton_config(tmp_path / "triton" / name / "config.pbtxt")
        assert tensors == {"images": [-1, 3, -1, -1], "logits": [-1, 3, -1, -1]} and header["name"] == name


def test_missing_onnx_names_the_install_command(classifier_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now fails as if it were not installed
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(UserError, match=r"^--export onnx needs onnx and onnxscript: "
                                        r"pip install -r requirements-export\.txt$"):
        evaluate("--checkpoint", classifier_checkpoint, "--device", "cpu", "--export", "onnx",
                 "--export-path", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_onnx_without_onnxruntime_is_written_unchecked(classifier_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    evaluate("--checkpoint", classifier_checkpoint, "--device", "cpu", "-b", "4", "--export", "onnx",
             "--export-path", tmp_path / "model.onnx")
    out = capsys.readouterr().out
    assert (tmp_path / "model.onnx").exists() and "max rel diff" not in out
    assert ("onnxruntime is not installed, so the ONNX model is not checked: "
            "pip install -r requirements-export.txt") in out


def test_a_failed_onnx_export_is_one_line_with_the_alternative(classifier_checkpoint, tmp_path, monkeypatch):
    def unsupported(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::foo\n(a long explanation)")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(UserError, match=r"^--export onnx failed \(RuntimeError: Unsupported operator aten::foo\): "
                                        r"try --export torchscript$"):
        evaluate("--checkpoint", classifier_checkpoint, "--device", "cpu", "--export", "onnx",
                 "--export-path", tmp_path / "model.onnx")


@pytest.mark.parametrize("flags, message", [
    (["--export-path", "model.pt"], "give --export torchscript|onnx together with --export-path FILE"),
    (["--export", "onnx"], "give --export torchscript|onnx together with --export-path FILE"),
    (["--export", "torchscript", "--export-path", "m.pt", "--export-triton", "repo"], "use it with --export onnx"),
])
def test_export_flags_that_do_not_fit_are_refused(classifier_checkpoint, flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        evaluate("--checkpoint", classifier_checkpoint, "--device", "cpu", *flags)


def test_parity_beyond_the_tolerance_is_refused():
    expected = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    check_parity(expected, expected + 3e-4, rtol=1e-4)  # 3e-4 / 4: within
    with pytest.raises(UserError, match=r"differs from the eager one by 0\.00025 relative, more than --export-rtol"):
        check_parity(expected, expected + 1e-3, rtol=1e-4)
    with pytest.raises(UserError, match="--export-rtol"):
        check_parity(expected, expected * float("nan"), rtol=1e-4)


def test_parity_runs_at_another_batch_size_and_image_size_than_the_export():
    example, batch = parity_inputs(torch.randn(1, 3, 40, 36), size_divisor=16)  # one real validation image
    assert example.shape == (2, 3, 32, 32) and batch.shape == (4, 3, 16, 16)
    example, batch = parity_inputs(torch.randn(5, 3, 32, 32), size_divisor=None)
    assert example.shape == (2, 3, 32, 32) and batch.shape == (5, 3, 32, 32)


@pytest.mark.parametrize("parser", [classification_parser, segmentation_parser])
def test_help_states_the_default_tolerance(parser):
    text = " ".join(parser().format_help().split())
    assert "max|exported - eager| / max|eager|" in text and "default: 1e-4" in text
