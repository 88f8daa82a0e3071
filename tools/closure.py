"""The files a user must copy for a script to run alone: its imports followed through this repository's own
modules, transitively, at module level and inside functions alike.

    python tools/closure.py classification/train.py segmentation/train.py

For each script it prints the files, their lines and characters, and the names the script itself uses from
the repository: each name imported from a repository module, and each distinct attribute read from a
repository module imported whole. An import inside a function of the modules that only an optional flag runs
(LAZY_MODULES) is not followed: those files are needed only with that flag.
"""
import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("classification", "common", "segmentation")
# Imported inside a function only when their flag is given: --data-backend gpu or synthetic, --export, --train-list,
# --class-weights, --freeze-backbone, segmentation's --loss, --max-bad-samples N, --model package.module:function,
# --output-dir (the folder's lock, provenance and TensorBoard with its pictures), a listing cache, a --dataset's
# layout, --model-ema, classification's --grad-checkpointing.
LAZY_MODULES = ("classification.gpu_preset", "common.device_loader", "common.export", "segmentation.gpu_augment",
                "common.synthetic_batches", "classification.list_file", "common.class_weights", "common.freeze",
                "segmentation.imbalance", "segmentation.folder", "common.bad_samples", "common.user_model",
                "common.output_dir", "classification.pictures", "segmentation.pictures", "classification.list_cache",
                "segmentation.datasets", "common.ema", "classification.grad_checkpointing")


def module_file(name):
    path = ROOT.joinpath(*name.split(".")).with_suffix(".py")
    return path if name.split(".")[0] in PACKAGES and path.is_file() else None


def repository_imports(tree, follow_lazy):
    """(module, names) for every import of a repository module in `tree`; names is None for `import module`."""
    lazy = set()
    if not follow_lazy:
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy.update(id(node) for node in ast.walk(function) if isinstance(node, ast.ImportFrom)
                            and node.module in LAZY_MODULES)
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and module_file(node.module):
            yield node.module, [alias.asname or alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if module_file(alias.name):
                    yield alias.name, None


def closure(script):
    """The repository files `script` needs, itself first."""
    seen, todo = [], [ROOT / script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        for module, _ in repository_imports(ast.parse(path.read_text()), follow_lazy=False):
            todo.append(module_file(module))
    return seen


def names_used(script):
    """The repository names the script itself uses."""
    tree = ast.parse((ROOT / script).read_text())
    names, whole = set(), {}
    for module, imported in repository_imports(tree, follow_lazy=True):
        if imported is None:
            whole[module.split(".")[-1]] = module
        else:
            names.update(f"{module}.{name}" for name in imported)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in whole:
            names.add(f"{whole[node.value.id]}.{node.attr}")
    return sorted(names)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scripts", nargs="+", help="paths relative to the repository root")
    parser.add_argument("--list", action="store_true", help="also list the files and the names")
    args = parser.parse_args()
    for script in args.scripts:
        files = closure(script)
        texts = [path.read_text() for path in files]
        lines, chars = sum(t.count("\n") for t in texts), sum(len(t) for t in texts)
        names = names_used(script)
        print(f"{script}: {len(files)} files, {lines:,} lines, {chars:,} characters; {len(names)} repository names")
        if args.list:
            for path, text in sorted(zip(files, texts), key=lambda pair: -len(pair[1])):
                print(f"    {path.relative_to(ROOT)}  {len(text):,}")
            print("    names: " + ", ".join(names))


if __name__ == "__main__":
    main()
