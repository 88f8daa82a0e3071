"""benchmarks/gpu_run.sh --smoke runs every phase of the GPU command end to end, tiny and on the CPU: the CUDA smoke
matrix's rows marked for it and every check (phase 1), the decoding comparison (2), the memory of
--grad-checkpointing (3), throughput.py's rows and the bars' summary (4); and the pieces that judge them.

What the phases measure is not checked here: speed and memory are measured on a GPU (benchmarks/README.md), never
in tests.
"""
import json
import os
import stat
import subprocess
import sys

import pytest
from conftest import ENV, ROOT

sys.path.insert(0, str(ROOT))
from benchmarks import cuda_matrix  # noqa: E402
from benchmarks.bars import BARS, check_bars, summary  # noqa: E402
from benchmarks.cuda_checks import CHECKS  # noqa: E402


def test_smoke_run_of_every_phase(tmp_path):
    # Phase 4 with one classification and one segmentation setting; the others differ only in flags. The timeout
    # is a hang guard, not a speed limit.
    done = subprocess.run(["bash", ROOT / "benchmarks/gpu_run.sh", "--smoke", tmp_path / "results", "--settings",
                           "r50-bf16-cl-compile", "deeplab-os8-bf16-cl", "--data-dir", tmp_path / "data"],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600,
                          env={**ENV, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "results" / "latest"
    printed = (run_dir / "summary.txt").read_text()
    assert "torch" in (run_dir / "env.txt").read_text() and "tensorboard" in printed
    assert all(f"# phase {n}: " in printed for n in (1, 2, 3, 4))

    # Phase 1: every row is read by its script's parser; the smoke rows trained, saved, resumed and compared.
    matrix = json.loads((run_dir / "phase1" / "matrix.json").read_text())
    rows = {row["name"]: row for row in matrix["rows"]}
    assert sorted(rows) == sorted(r[0] for r in cuda_matrix.ROWS if len(r) > 3 and r[3].get("smoke"))
    for row in rows.values():
        assert row["status"] == "pass", row
        assert row["losses_from"] == "tensorboard" and row["resume"]["steps_compared"] == 4
        assert len(row["validation"]) == cuda_matrix.EPOCHS
        assert [c["what"] for c in row["commands"]] == ["A", "B"]
    assert sorted(c["name"] for c in matrix["checks"]) == sorted(CHECKS)
    assert all(c["verdict"] in ("pass", "info") for c in matrix["checks"]), matrix["checks"]

    # Phase 2: the smoke tree's JPEGs decoded by the stand-in and by Pillow, directly and through the side stream.
    decode = json.loads((run_dir / "phase2" / "decode.json").read_text())
    for section in ("decode", "side_stream"):
        assert decode[section]["device_files"] > 0 and decode[section]["shape_mismatch_files"] == []
        assert decode[section]["bar_met"] is None  # nothing is judged on the CPU
    assert "pillow/png" in decode["decode"]["by_decoder_and_kind"]  # the PNG named .jpg goes to Pillow
    assert decode["side_stream"]["count_changed"] == 0 and decode["side_stream"]["training_losses_finite"]
    assert decode["presets"]["bit_exact"]

    # Phase 3: the four settings' steps ran (memory is only measured on CUDA).
    memory = json.loads((run_dir / "phase3" / "memory.json").read_text())
    assert [(r["model"], r["grad_checkpointing"]) for r in memory["rows"]] == \
        [(m, g) for m in ("resnet50", "deeplabv3plus_resnet50") for g in (False, True)]
    assert all("error" not in r and r["img_per_s"] > 0 for r in memory["rows"])

    # Phase 4: a row per configuration, the bars' summary.
    result = json.loads((run_dir / "phase4" / "throughput.json").read_text())
    rows = [(r["setting"], r["step"], r["backend"], r["compiled"]) for r in result["rows"]]
    backends = ("synthetic", "gpu", "pil")
    assert rows == [("r50-bf16-cl-compile", step, b, False) for step in ("train", "eval") for b in backends] + \
        [("deeplab-os8-bf16-cl", "train", b, False) for b in backends]
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["img_per_s"] > 0 and row["passes_started_while_timed"] == 0
        assert row["hardware"] and row["torch"] and row["date"]
        assert row["optimizer"] == "SGD (for-loop)"  # as the scripts build it on the CPU: never fused
    # The tree holds every size class and every file kind the decoders treat apart.
    tree = result["data"]["imagefolder"]
    assert all(count > 0 for count in tree["files_per_size_class"]) and tree["gray"] and tree["cmyk"] and tree["png"]
    assert [bar["met"] for bar in result["bars"]] == [None] * len(BARS)  # a smoke run judges no bar
    table = [line for line in done.stdout.splitlines() if line.startswith(("| train", "| eval"))]
    assert len(table) == 2 * len(rows)  # each row as it finished, then the whole table again
    assert all(f"{name}:" in printed for name, *_ in BARS) and "not judged: smoke run" in printed


@pytest.fixture
def fake_python(tmp_path):
    """A stand-in for the interpreter that notes each script gpu_run.sh starts, and does nothing."""
    log, path = tmp_path / "started.txt", tmp_path / "python"
    path.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path, log


def started_scripts(log):
    names = ("cuda_matrix.py", "decode_check.py", "memory_flags.py", "throughput.py")
    return [name for line in log.read_text().splitlines() for name in names if name in line]


def test_phases_run_as_chosen_in_their_order(tmp_path, fake_python):
    python, log = fake_python
    done = subprocess.run(["bash", ROOT / "benchmarks/gpu_run.sh", "--smoke", "--phases", "4,2", tmp_path / "r"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env={**ENV, "PYTHON": str(python)})
    assert done.returncode == 0, done.stderr
    assert started_scripts(log) == ["decode_check.py", "throughput.py"]


def test_a_phase_the_call_has_no_time_for_is_not_started_and_says_so(tmp_path, fake_python):
    python, log = fake_python
    done = subprocess.run(["bash", ROOT / "benchmarks/gpu_run.sh", "--phases", "1,2", tmp_path / "r"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**ENV, "PYTHON": str(python), "CALL_LIMIT": "70"})
    assert done.returncode == 3
    assert started_scripts(log) == ["cuda_matrix.py"]  # phase 2 needs 80 s
    assert "# phase 2: not started, the call has" in (tmp_path / "r" / "latest" / "summary.txt").read_text()


def test_phases_flag_is_checked():
    done = subprocess.run(["bash", ROOT / "benchmarks/gpu_run.sh", "--phases", "1,5", "/tmp/unused"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--phases takes phases 1 to 4" in done.stderr


def test_every_row_of_the_matrix_is_taken_by_its_script():
    parsers = cuda_matrix.parsers()
    names = [row.name for row in cuda_matrix.rows_of(cuda_matrix.ROWS)]
    assert len(names) == len(set(names))
    for row in cuda_matrix.rows_of(cuda_matrix.ROWS):
        assert cuda_matrix.check_flags(row, parsers[row.script]) is None, row.name
    typo = cuda_matrix.Row("typo", cuda_matrix.CLS, "--amp --chanels-last")
    assert cuda_matrix.check_flags(typo, parsers[cuda_matrix.CLS])[0] == "fail"


def test_resumed_losses_are_compared_step_by_step():
    uninterrupted = {0: 2.0, 1: 1.5, 2: 1.25, 3: 1.0}
    assert cuda_matrix.compare_losses(uninterrupted, {2: 1.25, 3: 1.0}, 1e-3)["bit_exact"]
    close = cuda_matrix.compare_losses(uninterrupted, {2: 1.25, 3: 1.0000001}, 1e-3)
    assert close["close"] and not close["bit_exact"]
    assert not cuda_matrix.compare_losses(uninterrupted, {2: 1.25, 3: 1.1}, 1e-3)["close"]  # a wrong step
    assert cuda_matrix.compare_losses(uninterrupted, {4: 1.0}, 1e-3)["steps_compared"] == 0


def test_recompilations_count_from_the_first_progress_line_of_epoch_1():
    log = "\n".join([
        "V1203 [0/0] [__recompiles] Recompiling function forward in model.py:10",  # eval after train: allowed
        "Epoch 0 val: top-1 50.000  top-5 100.000  on 64 images",
        "Epoch: [1] [1/8]  eta: 0:01  lr: 0.1  loss: 1.0000 (1.0000)",
        "V1203 [0/2] [__recompiles] Recompiling function forward in model.py:10",
        "W1203 torch._dynamo hit config.recompile_limit (8)"])
    assert cuda_matrix.recompilations(log) == {"total": 2, "from_epoch_1_on": 1, "limit_hit": True}
    assert cuda_matrix.printed_losses(log) == {8: 1.0}


def bar_row(setting, step, backend, img_per_s, memory=None):
    return {"setting": setting, "step": step, "backend": backend, "img_per_s": img_per_s, "peak_memory_gib": memory}


def test_bars_are_judged_from_the_rows_they_name():
    rows = [bar_row("r50-bf16-cl-compile", "train", "synthetic", 5400, 10.0),
            bar_row("r50-bf16-cl-compile", "train", "gpu", 5200, 13.0),
            bar_row("r50-bf16-cl-compile", "train", "pil", 1700, 10.5),
            bar_row("r50-bf16-cl-compile", "eval", "gpu", 9000, 5.0),
            bar_row("r50-fp16", "train", "gpu", 9999, 1.0),  # another setting: no bar reads it
            bar_row("deeplab-os8-bf16-cl", "train", "gpu", 140, 31.0),
            bar_row("deeplab-os8-bf16-cl-compile", "train", "gpu", 160, 30.0)]
    bars = check_bars(rows)
    assert [bar["met"] for bar in bars] == [True] * 6
    assert bars[5]["measured"] == "160 img/s (deeplab-os8-bf16-cl-compile, peak 30.0 GiB)"
    rows[1] = bar_row("r50-bf16-cl-compile", "train", "gpu", 4900, 15.0)  # slower, and 5 GiB over synthetic
    assert [bar["met"] for bar in check_bars(rows)] == [False, True, True, False, True, True]
    assert [bar["met"] for bar in check_bars(rows[:2] + rows[3:])][2] is None  # no pil row: no verdict
    assert [bar["met"] for bar in check_bars(rows, judged=False)] == [None] * 6
    printed = summary({"rows": rows, "bars_judged": True})
    assert printed.count("- PASS:") == 4 and printed.count("- FAIL:") == 2


def test_gpu_run_passes_shellcheck():
    shellcheck = subprocess.run(["which", "shellcheck"], capture_output=True, text=True).stdout.strip()
    if not shellcheck or not os.access(shellcheck, os.X_OK):
        pytest.skip("shellcheck not installed: pip install -r requirements-dev.txt")
    done = subprocess.run([shellcheck, ROOT / "benchmarks/gpu_run.sh"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
