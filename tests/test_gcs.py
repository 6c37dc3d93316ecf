"""gs:// wherever a path is taken, against a real Cloud Storage emulator (fake-gcs-server, tests/gcs_emulator.py):
convert into and out of a bucket (either side, --to-hf), llama_jax.load(gs://...), train.py with workdir,
data.path and init_from in a bucket then an exact resume, and two processes writing one checkpoint to the
bucket and resuming from it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gcs_emulator
from gcs_emulator import BUCKET
from test_train import ROOT, TINY, _env, _free_port, outputs_of

GS = f"gs://{BUCKET}"


@pytest.fixture(scope="session")
def emulator():
    try:
        return gcs_emulator.start()
    except (ImportError, RuntimeError, OSError) as e:
        pytest.skip(f"the Cloud Storage emulator (fake-gcs-server) cannot start here: {e}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Hugging Face model (vocabulary 512, the built-in corpus's) in two safetensors shards."""
    from hf_util import make_hf_model
    from llama_jax import LlamaConfig

    path = tmp_path_factory.mktemp("gcs") / "hf"
    make_hf_model(LlamaConfig.from_preset("tiny", vocab_size=512)).save_pretrained(path, max_shard_size="200KB")
    return str(path)


@pytest.fixture(scope="module")
def in_bucket(emulator, hf_dir):
    """The HF directory uploaded to gs://BUCKET/hf, and converted from there into gs://BUCKET/ckpt."""
    from llama_jax.io import paths
    from llama_jax.io.convert import main

    for name in os.listdir(hf_dir):
        paths.copy_file(os.path.join(hf_dir, name), f"{GS}/hf/{name}")
    assert main([f"{GS}/hf", f"{GS}/ckpt", "--no-progress"]) == 0
    return f"{GS}/ckpt"


def _same(a, b):
    import jax

    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_convert_into_a_bucket_and_load_it_back(in_bucket, hf_dir, tmp_path):
    from llama_jax import load
    from llama_jax.io import paths
    from llama_jax.io.convert import main

    assert paths.listdir(in_bucket) == ["generation_config.json", "llama_jax.json", "params"]
    assert not [n for n in paths.listdir(GS) if n.startswith(".")]  # the staging prefix is gone
    config, params = load(in_bucket)
    reference_config, reference = load(hf_dir)
    assert config == reference_config
    _same(params, reference)
    # the other way round: a local source straight into the bucket, and --force to replace it
    assert main([hf_dir, f"{GS}/ckpt-local", "--no-progress"]) == 0
    assert main([hf_dir, f"{GS}/ckpt-local", "--no-progress"]) == 1  # not empty: needs --force
    assert main([hf_dir, f"{GS}/ckpt-local", "--no-progress", "--force"]) == 0
    _same(load(f"{GS}/ckpt-local")[1], reference)


def test_export_to_hf_and_gguf_out_of_a_bucket(in_bucket, hf_dir, tmp_path):
    from llama_jax import load
    from llama_jax.io import paths
    from llama_jax.io.convert import main

    reference = load(hf_dir)[1]
    assert main(["--to-hf", in_bucket, f"{GS}/hf-out", "--no-progress"]) == 0  # bucket to bucket
    names = paths.listdir(f"{GS}/hf-out")
    assert "config.json" in names and "model.safetensors.index.json" in names
    _same(load(f"{GS}/hf-out")[1], reference)  # a HF directory in a bucket: read through the local cache
    assert main(["--to-gguf", in_bucket, f"{GS}/tiny.gguf", "--type", "f32", "--no-progress"]) == 0
    _same(load(f"{GS}/tiny.gguf")[1], reference)  # one object, read through the local cache
    local = str(tmp_path / "hf-local")
    assert main(["--to-hf", in_bucket, local, "--no-progress"]) == 0  # bucket to local disk
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(local)
    expected = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    for (n, p), (_, q) in zip(model.state_dict().items(), expected.state_dict().items()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=n)


def _upload_corpus():
    from test_data import corpus_dir
    from llama_jax.io import paths

    path = corpus_dir()
    for name in sorted(os.listdir(path)):
        if os.path.isfile(os.path.join(path, name)) and not paths.exists(f"{GS}/data/{name}"):
            paths.copy_file(os.path.join(path, name), f"{GS}/data/{name}")
    return f"{GS}/data"


def _train(args, devices=1):
    proc = subprocess.run([sys.executable, "train.py", "--no_progress", *args], cwd=ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _losses(workdir):
    from llama_jax.io import paths

    with paths.open(f"{workdir}/metrics.jsonl") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def test_train_in_a_bucket_then_resume_exactly(in_bucket):
    """workdir, data.path and init_from all in the bucket; the run is cut back to its step-2 checkpoint and
    resumed: steps 3 and 4 give the same losses, bit for bit."""
    from llama_jax import load
    from llama_jax.io import paths

    work = f"{GS}/run"
    args = [f"workdir={work}", *TINY, f"data.path={_upload_corpus()}", f"init_from={in_bucket}", "steps=4",
            "checkpoint_every=2"]
    _train(args)
    assert paths.listdir(f"{work}/checkpoints") == ["2", "4"]
    uninterrupted = _losses(work)
    assert [s for s, _ in uninterrupted] == [1, 2, 3, 4]
    exported = load(work)[1]  # the run's export, read from the bucket
    paths.rmtree(f"{work}/checkpoints/4")  # as if the run had been killed after its step-2 checkpoint
    out = _train(args)
    assert f"resumed from {work}/checkpoints/2" in out, out
    assert _losses(work) == uninterrupted
    _same(load(work)[1], exported)
    from llama_jax.sampling import Sampler

    sampler = Sampler.load(work)  # weights from the bucket, the tokenizer files through the local cache
    assert sampler.config.vocab_size == 512 and len(sampler.tokenizer.encode("The cat")) > 1


@pytest.mark.slow
def test_two_processes_write_one_checkpoint_to_the_bucket_and_resume(emulator):
    work, port = f"{GS}/two", _free_port()
    args = [f"workdir={work}", *TINY, f"data.path={_upload_corpus()}", "checkpoint_every=2", "mesh.data=2",
            "mesh.fsdp=2"]

    def both(steps):
        flags = [["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)]
                 for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "train.py", "--no_progress", *args, f"steps={steps}", *f],
                                  cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for f in flags]
        outs = outputs_of(procs)
        assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
        return outs[0]

    from llama_jax.io import paths

    both(2)
    assert paths.listdir(f"{work}/checkpoints") == ["2"]
    out = both(4)
    assert f"resumed from {work}/checkpoints/2" in out, out
    assert paths.listdir(f"{work}/checkpoints") == ["2", "4"]
    assert [s for s, _ in _losses(work)] == [1, 2, 3, 4]
