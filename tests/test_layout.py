"""What a copy of a train script costs (README, "Layout"): the files and repository names it needs, the
optional paths left out until their flag chooses them, and functions that take a few well-named objects."""
import ast
import subprocess
import sys

import pytest

from conftest import ENV, ROOT
from tools.closure import LAZY_MODULES, closure, names_used

SCRIPTS = ["classification/train.py", "segmentation/train.py"]
# Segmentation's two more: the lazy imports of --class-weights' pixel count and of the Dice loss.
MOST_NAMES = {"classification/train.py": 30, "segmentation/train.py": 32}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_train_script_needs_at_most_14_files_and_few_repository_names(script):
    files = [str(path.relative_to(ROOT)) for path in closure(script)]
    assert len(files) <= 14, files
    assert not [f for f in files if f.removesuffix(".py").replace("/", ".") in LAZY_MODULES]
    assert len(names_used(script)) <= MOST_NAMES[script], names_used(script)


def modules_loaded_by(*modules):
    code = f"import sys, {', '.join(modules)}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(result.stdout.split())


def test_the_gpu_backend_and_export_are_imported_only_when_chosen():
    assert modules_loaded_by("classification.train", "segmentation.train").isdisjoint(LAZY_MODULES)
    # The eval scripts take their --export flags from common/export.py (2 ms on top of torch, which loads
    # torch.export itself); the exporters' packages and the GPU backend wait for their flags.
    loaded = modules_loaded_by("classification.eval", "segmentation.eval")
    assert loaded.isdisjoint({"onnx", "onnxscript", "onnxruntime", *LAZY_MODULES} - {"common.export"})


def test_no_function_takes_more_than_12_parameters():
    crowded = []
    for path in [*ROOT.glob("classification/*.py"), *ROOT.glob("segmentation/*.py"), *ROOT.glob("common/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
                if len(names) + bool(args.vararg) + bool(args.kwarg) > 12:
                    crowded.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not crowded
