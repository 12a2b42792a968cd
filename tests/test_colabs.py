"""The notebooks in colabs/ run top to bottom (on a CPU, in about a minute each)."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLABS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colabs")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(f for f in os.listdir(COLABS) if f.endswith(".ipynb")))
def test_notebook_runs(name):
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": COLABS}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors
