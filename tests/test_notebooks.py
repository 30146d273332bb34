"""The notebooks run headless, top to bottom, so they cannot rot."""

import os

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compose_transforms_notebook_runs():
    path = os.path.join(ROOT, "notebooks", "compose_transforms.ipynb")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "hypergradient" in outputs and "Lanczos" in outputs
