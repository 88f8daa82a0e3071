"""benchmarks/throughput.py runs end to end: tiny sizes on the CPU, every backend, train and eval rows.

What it measures is not checked here: speed is measured on a GPU (benchmarks/README.md), never in tests.
"""
import json
import sys

from conftest import ROOT, run


def test_smoke_run_writes_a_row_per_configuration(tmp_path):
    out = tmp_path / "throughput.json"
    # One classification and one segmentation setting keep it to seconds; the others differ only in flags.
    done = run(sys.executable, ROOT / "benchmarks/throughput.py", "--device", "cpu", "--smoke", "--settings",
               "r50-bf16-cl-compile", "deeplab-os8-bf16-cl-compile", "--data-dir", tmp_path / "data", "--out", out,
               timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = [(r["model"], r["step"], r["backend"]) for r in result["rows"]]
    backends = ("synthetic", "gpu", "pil")
    assert rows == [("ResNet-50", step, backend) for step in ("train", "eval") for backend in backends] + \
        [("DeepLabV3+ R50 OS8", "train", backend) for backend in backends]
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["img_per_s"] > 0 and row["passes_started_while_timed"] == 0
        assert row["hardware"] and row["torch"] and row["date"]
    assert result["bars"] == []  # a smoke run checks no bar
    table = [line for line in done.stdout.splitlines() if line.startswith(("| train", "| eval"))]
    assert len(table) == 2 * len(rows)  # each row as it finished, then the whole table again
