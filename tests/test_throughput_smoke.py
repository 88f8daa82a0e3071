"""benchmarks/gpu_run.sh --smoke runs benchmarks/throughput.py end to end: tiny sizes on the CPU, every backend,
train and eval rows, the summary of the bars; and the bars' verdicts from rows.

What it measures is not checked here: speed is measured on a GPU (benchmarks/README.md), never in tests.
"""
import json
import subprocess
import sys

from conftest import ENV, ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.bars import BARS, check_bars, summary  # noqa: E402


def test_smoke_run_writes_a_row_per_configuration_and_the_summary(tmp_path):
    # One classification and one segmentation setting; the others differ only in flags. The timeout is a hang
    # guard, not a speed limit: the run takes seconds.
    done = subprocess.run(["bash", ROOT / "benchmarks/gpu_run.sh", "--smoke", tmp_path / "results", "--settings",
                           "r50-bf16-cl-compile", "deeplab-os8-bf16-cl", "--data-dir", tmp_path / "data"],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600,
                          env={**ENV, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "results" / "latest"
    result = json.loads((run_dir / "throughput.json").read_text())
    rows = [(r["setting"], r["step"], r["backend"], r["compiled"]) for r in result["rows"]]
    backends = ("synthetic", "gpu", "pil")
    assert rows == [("r50-bf16-cl-compile", step, b, False) for step in ("train", "eval") for b in backends] + \
        [("deeplab-os8-bf16-cl", "train", b, False) for b in backends]
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["img_per_s"] > 0 and row["passes_started_while_timed"] == 0
        assert row["hardware"] and row["torch"] and row["date"]
    # The tree holds every size class and every file kind the decoders treat apart.
    tree = result["data"]["imagefolder"]
    assert all(count > 0 for count in tree["files_per_size_class"]) and tree["gray"] and tree["cmyk"] and tree["png"]
    assert [bar["met"] for bar in result["bars"]] == [None] * len(BARS)  # a smoke run judges no bar
    table = [line for line in done.stdout.splitlines() if line.startswith(("| train", "| eval"))]
    assert len(table) == 2 * len(rows)  # each row as it finished, then the whole table again
    printed = (run_dir / "summary.txt").read_text()
    assert all(f"{name}:" in printed for name, *_ in BARS) and "not judged: smoke run" in printed
    assert "torch" in (run_dir / "env.txt").read_text()


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
