"""examples/quickstart.ipynb runs from top to bottom in a real Jupyter kernel on the zoo's Gemma-3 270M."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from attnpatch.models import is_installed

    if not is_installed("gemma-3-270m"):
        pytest.skip("the zoo's gemma-3-270m package is not installed")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel draws inline, as in a notebook
    nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    text = "\n".join(
        out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "Patch(Gemma3ForCausalLM <- act(beta=0.4" in text
    assert "restored bit for bit: True" in text
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the before/after attention map was not drawn"
