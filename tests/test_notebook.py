"""The Colab worker notebook, executed headless against a local root with a submitted job."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import Result, validate_config
from cherry_train.storage import LocalStorage

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "colab_worker.ipynb"


def test_the_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.slow
def test_notebook_runs_a_job_outside_colab(root_with_data, tiny_config, monkeypatch):
    queue = JobQueue(LocalStorage(root_with_data))
    job_id = queue.submit(validate_config(tiny_config)).job_id
    monkeypatch.setenv("CHERRY_ROOT", str(root_with_data))
    monkeypatch.setenv("CHERRY_WORKER_ID", "notebook-test")
    monkeypatch.setenv("CHERRY_IDLE_SHUTDOWN_MINUTES", "0.05")  # exit once the queue is empty
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(root_with_data)}}).execute()

    result = Result.from_json((root_with_data / "done" / job_id / "result.json").read_bytes())
    assert result.state.value == "succeeded", result.error
    assert result.attempt_history[0].worker_id == "notebook-test"
    text = "\n".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert "skipping the Drive mount" in text and "skipping the install" in text
    assert "No PACK_FOLDER: skipping the data pack" in text  # the optional cell ran
    assert "worker exited with 0" in text
    assert f"{job_id}: succeeded" in text  # the status cell
    shown = [out for cell in nb.cells for out in cell.get("outputs", [])
             if "image/png" in out.get("data", {})]
    assert shown, "the curves of the finished job are displayed"
