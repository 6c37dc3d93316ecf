"""gs:// paths (tests/gcs_emulator.py starts a real Cloud Storage emulator on first use): malformed bucket
paths, missing objects and buckets, for the loader, the converter (either side) and a training run's
workdir, data.path and init_from. Each is one line naming the path."""

from hostile import Case


def _gs(path: str) -> str:
    import gcs_emulator
    import pytest

    try:
        gcs_emulator.start()
    except (ImportError, RuntimeError, OSError) as e:
        pytest.skip(f"the Cloud Storage emulator (fake-gcs-server) cannot start here: {e}")
    return f"gs://{gcs_emulator.BUCKET}/{path}"


def _load(path):
    def run(tmp):
        from llama_jax import load
        return load(path if path.startswith("gs://") else _gs(path))
    return run


def _convert(*args):
    def run(tmp):
        from llama_jax.io.convert import main
        from hostile.fixtures import tiny_hf_dir

        argv = [str(tiny_hf_dir(tmp / "src")) if a == "SRC" else str(tmp / "dst") if a == "DST"
                else a if a.startswith(("gs://", "--")) else _gs(a) for a in args]
        raise SystemExit(main([*argv, "--no-progress"]))
    return run


def _train(key, value):
    def run(tmp):
        from llama_jax.training import run_config
        from llama_jax.training.setup import resolve

        value_ = value if value.startswith("gs://") else _gs(value)
        cfg = run_config.build("", [f"workdir={tmp}/w", "model.preset=tiny", f"{key}={value_}"])
        return resolve(cfg, lambda *a, **k: None)
    return run


def _workdir(tmp):
    from llama_jax.training import run_config
    return run_config.build("", ["workdir=gs://Not_A_Bucket!/run"])


def _metadata_without_params(tmp):
    from llama_jax import load
    from llama_jax.io import paths

    path = _gs("half-written")
    with paths.open(f"{path}/llama_jax.json", "w") as f:
        f.write('{"format": "llama_jax.params", "param_layout": "%s"}' % __import__(
            "llama_jax.model.spec", fromlist=["PARAM_LAYOUT"]).PARAM_LAYOUT)
    return load(path)


def _convert_to_bucket_root(tmp):
    from hostile.fixtures import tiny_hf_dir
    from llama_jax.io.convert import main

    raise SystemExit(main([str(tiny_hf_dir(tmp / "src")), _gs("").rstrip("/"), "--no-progress"]))


CASES = [
    Case("load: a path climbing out of its bucket", _load("gs://some-bucket/a/../../x"), r"climbs above its bucket"),
    Case("convert: into the bucket's root", _convert_to_bucket_root, r"an output needs a folder inside the bucket"),
    Case("load: a bucket name with capitals and '!'", _load("gs://Bad_Bucket!/model"), r"gs://Bad_Bucket!/model: not a Cloud Storage path"),
    Case("load: gs:// with no bucket", _load("gs://"), r"gs://: not a Cloud Storage path"),
    Case("load: no such object in the bucket", _load("no/such/model"), r"gs://.*/no/such/model: no such object"),
    Case("load: llama_jax.json without params/", _metadata_without_params, r"half-written: has llama_jax.json but no params/"),
    Case("convert: missing source in the bucket", _convert("missing-src", "DST"), r"missing-src: no such object"),
    Case("convert: into a bucket that does not exist", _convert("SRC", "gs://no-such-bucket-llama/out"), r"bucket gs://no-such-bucket-llama does not exist"),
    Case("convert: into a malformed bucket path", _convert("SRC", "gs://x/out"), r"gs://x/out: not a Cloud Storage path"),
    Case("convert --to-hf: missing checkpoint in the bucket", _convert("--to-hf", "missing-ckpt", "DST"), r"missing-ckpt: not a llama_jax checkpoint"),
    Case("train: data.path missing in the bucket", _train("data.path", "no-data"), r"data.path=.*no-data.*no such object"),
    Case("train: init_from missing in the bucket", _train("init_from", "no-model"), r"init_from=.*no-model.*no such object"),
    Case("train: workdir with a malformed bucket", _workdir, r"workdir='gs://Not_A_Bucket!/run': .*not a Cloud Storage path"),
]
