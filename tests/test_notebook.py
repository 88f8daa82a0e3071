"""notebooks/quickstart.ipynb runs top to bottom, as JupyterLab would run it, and is kept without outputs."""
import pytest

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_the_quickstart_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat", reason="pip install -r requirements-dev.txt")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_the_quickstart_notebook_trains_reports_and_predicts(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="pip install -r requirements-dev.txt")
    nbclient = pytest.importorskip("nbclient", reason="pip install -r requirements-dev.txt")
    pytest.importorskip("matplotlib", reason="pip install -r requirements-report.txt")
    monkeypatch.setenv("QUICKSTART_RUN_DIR", str(tmp_path / "run"))  # the kernel and the training inherit it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    assert (tmp_path / "run" / "report.html").stat().st_size > 10_000
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == 2  # the curves and the confusion matrix
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    predictions = [line for line in printed.splitlines() if line.endswith("%") and ".png" in line]
    assert len(predictions) == 8 and all(line.count("%") == 3 for line in predictions)  # the top 3 of each picture
