"""notebooks/sample.ipynb runs headless (nbclient) on a tiny Hugging Face checkpoint the test writes: source and
install (skipped: llama_jax is importable), get the model, convert, load, show the device, sample, stream and
chat. Offline: the model is a local directory (LLAMA_JAX_CHECKPOINT), so no Hub name is fetched."""

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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "sample.ipynb"), as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = {cell.source.split("\n")[0][:4]: "".join(o.get("text", "") for o in cell.get("outputs", []))
               for cell in nb.cells if cell.cell_type == "code"}  # by the cell's number: "# 3.", ...
    assert os.path.isfile(tmp_path / "converted" / "llama_jax.json")  # the HF directory was converted
    assert os.path.isdir(tmp_path / "runs" / "notebook")  # its own output folder, under the working directory
    assert f"model: {ckpt}" in outputs["# 3."]
    assert "LlamaConfig(" in outputs["# 4."] and "SentencePieceTokenizer" in outputs["# 4."]
    assert "backend: cpu" in outputs["# 5."] and "weights on: ['cpu:0']" in outputs["# 5."]
    assert outputs["# 6."].count("'The") == 1 and outputs["# 6."].count("'Once upon a time") == 1
    assert outputs["# 7."].strip()  # a chat reply
