"""notebooks/quickstart.ipynb executes top to bottom (shrunk by AGQ_QUICKSTART_SMALL) with nbclient."""
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("AGQ_QUICKSTART_SMALL", "1")
    monkeypatch.setenv("AGQ_QUICKSTART_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "SFT only" in text and "after GRPO" in text
    assert "[agent, transformers]" in text
    assert os.path.isdir(tmp_path / "run" / "export" / "round_1")
