"""What a copy of a train script costs (README, "Layout"): the files and repository names it needs, the
optional paths left out until their flag chooses them, and functions that take a few well-named objects."""
import ast
import subprocess
import sys

import pytest

from conftest import ENV, ROOT
from tools.closure import LAZY_MODULES, closure, names_used

SCRIPTS = ["classification/train.py", "segmentation/train.py"]
# (files, characters) a copy needs at most: issue 33's bars.
MOST = {"classification/train.py": (12, 140_000), "segmentation/train.py": (13, 150_000)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_train_script_needs_few_files_characters_and_repository_names(script):
    paths = closure(script)
    files = [str(path.relative_to(ROOT)) for path in paths]
    most_files, most_characters = MOST[script]
    assert len(files) <= most_files, files
    assert sum(len(path.read_text()) for path in paths) <= most_characters
    assert not [f for f in files if f.removesuffix(".py").replace("/", ".") in LAZY_MODULES]
    assert len(names_used(script)) <= 30, names_used(script)


def modules_loaded_by(*modules):
    code = f"import sys, {', '.join(modules)}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(result.stdout.split())


def test_the_gpu_backend_and_export_are_imported_only_when_chosen():
    assert modules_loaded_by("classification.train", "segmentation.train").isdisjoint(LAZY_MODULES)
    # The eval scripts take their --export flags from common/export.py (2 ms on top of torch, which loads
    # torch.export itself); the exporters' packages and the GPU backend wait for their flags.
    # Besides, they write to their destinations, draw the confusion matrix and write Cityscapes' label ids.
    loaded = modules_loaded_by("classification.eval", "segmentation.eval")
    needed = {"common.export", "common.output_dir", "classification.pictures", "segmentation.datasets"}
    assert loaded.isdisjoint({"onnx", "onnxscript", "onnxruntime", *LAZY_MODULES} - needed)


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


def test_each_loop_is_flat_and_short_and_the_scripts_share_no_block_of_10_lines():
    shared = {}
    for script in SCRIPTS:
        tree = ast.parse((ROOT / script).read_text())
        main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
        loop = next(node for node in main.body if isinstance(node, (ast.For, ast.While)))
        assert not [node for node in ast.walk(loop) if isinstance(node, (ast.For, ast.While)) and node is not loop]
        assert main.end_lineno - loop.lineno + 1 <= 45, script
        lines = [line.strip() for line in (ROOT / script).read_text().splitlines() if line.strip()]
        shared[script] = {tuple(lines[i:i + 10]) for i in range(len(lines) - 9)}
    assert not set.intersection(*shared.values())
