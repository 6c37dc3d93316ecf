"""notebooks/sample.ipynb runs headless (nbclient) on a tiny Hugging Face checkpoint the test writes: install
(skipped), convert, load, sample, stream and chat."""

import os

import nbformat
import pytest

from test_sampling import ROOT, write_tiny_checkpoint


@pytest.mark.slow
def test_sample_notebook_runs(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    ckpt = write_tiny_checkpoint(str(tmp_path / "hf"))
    monkeypatch.setenv("LLAMA_JAX_CHECKPOINT", ckpt)
    monkeypatch.setenv("LLAMA_JAX_CONVERTED", str(tmp_path / "converted"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "sample.ipynb"), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = ["".join(o.get("text", "") for o in cell.get("outputs", [])) for cell in nb.cells
               if cell.cell_type == "code"]
    assert os.path.isfile(tmp_path / "converted" / "llama_jax.json")  # the HF directory was converted
    assert "LlamaConfig(" in outputs[2] and "SentencePieceTokenizer" in outputs[2]
    assert outputs[3].count("'The") == 1 and outputs[3].count("'Once upon a time") == 1
    assert outputs[4].strip()  # a chat reply
