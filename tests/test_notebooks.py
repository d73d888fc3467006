"""Every notebook runs top to bottom on the CPU with the tiny model (nbclient, fresh kernel, own folder)."""

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    assert len(NOTEBOOKS) == 5
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name


# Post-training notebooks' step counts in CI: enough to draw every curve, not to learn as much as a reader sees.
SMALLER = {"04_align": {"SFT_STEPS": 20, "DPO_STEPS": 10}, "05_rl": {"SFT_STEPS": 20, "GRPO_STEPS": 20}}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    workdir = tmp_path / "notebooks"
    workdir.mkdir()
    shutil.copytree(path.parents[1] / "configs", tmp_path / "configs")
    monkeypatch.setenv("PHI2_JAX_CACHE", str(tmp_path.parent / "notebook_cache"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebook's own (inline) backend, as a user has it
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(path, as_version=4)
    for name, value in SMALLER.get(path.stem, {}).items():  # CI runs these at a smaller size than a reader does
        parameters = nb.cells[1]
        assert f"{name} = " in parameters.source, f"{path.name}: its first code cell sets no {name}"
        parameters.source = "\n".join(f"{name} = {value}" if line.startswith(f"{name} = ") else line
                                      for line in parameters.source.splitlines())
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # Every cell that draws shows its picture (the trainer's own plotting must not switch the backend away).
    for cell in nb.cells:
        if cell.cell_type == "code" and ("plt." in cell.source or "imshow" in cell.source):
            images = [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
            assert images, f"{path.name}: no image in the cell drawing\n{cell.source[:200]}"
