"""hf://org/name through huggingface_hub, without a network: the library's offline mode over a cache laid out here
in its own layout (models--org--name/snapshots/<sha>/..., refs/main), and a local HTTP server answering as the
Hub does for a gated or missing model. The push direction is checked with --dry-run (CommitOperationAdd list)."""

import http.server
import os
import shutil
import threading

import numpy as np
import pytest

import llama_jax
from llama_jax.errors import HubError
from llama_jax.io import hub
from test_sampling import write_tiny_checkpoint

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402

REPO = "test-org/tiny-llama"
SHA = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(cache: str, hf_dir: str, repo: str = REPO, sha: str = SHA) -> str:
    """The Hugging Face cache's layout for `repo` at commit `sha` (main), holding the files of `hf_dir`."""
    storage = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(storage, "snapshots", sha)
    shutil.copytree(hf_dir, snapshot)
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    with open(os.path.join(storage, "refs", "main"), "w") as f:
        f.write(sha)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    hf_dir = write_tiny_checkpoint(str(root / "src"))
    cache = str(root / "cache")
    snapshot = lay_out_hub_cache(cache, hf_dir)
    return cache, hf_dir, snapshot


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=<the laid-out cache>, as the library reads them (at import)."""
    cache = hub_cache[0]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    return hub_cache


def test_parse_names():
    assert hub.parse("hf://meta-llama/Llama-3.2-1B") == ("meta-llama/Llama-3.2-1B", None, "")
    assert hub.parse("hf://org/name/original@v1.0") == ("org/name", "v1.0", "original")
    assert hub.resolve("plain/dir") == "plain/dir"
    for bad in ("hf://name-only", "hf://org/name@", "hf:///"):
        with pytest.raises(HubError, match="expected hf://ORG/NAME"):
            hub.parse(bad)
    assert "config.json" in hub.allow_patterns() and "original/params.json" in hub.allow_patterns("original")


def test_load_and_sampler_by_hub_name(offline):
    _, hf_dir, snapshot = offline
    assert hub.resolve(f"hf://{REPO}") == snapshot
    assert hub.resolve(f"hf://{REPO}@{SHA}") == snapshot
    config, params = llama_jax.load(f"hf://{REPO}")
    config_local, params_local = llama_jax.load(hf_dir)
    assert config == config_local
    import jax
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_local)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    sampler = llama_jax.Sampler.load(f"hf://{REPO}")
    local = llama_jax.Sampler.load(hf_dir)
    assert sampler.generate("the quick", 6, temperature=0) == local.generate("the quick", 6, temperature=0)


def test_init_from_and_converter_take_hub_names(offline, tmp_path, capsys):
    from llama_jax.io.convert import main
    from llama_jax.training.setup import _init_config

    assert _init_config(f"hf://{REPO}").num_layers == llama_jax.load(offline[1])[0].num_layers
    dst = tmp_path / "converted"
    assert main([f"hf://{REPO}", str(dst), "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"wrote a llama_jax checkpoint to {dst}: ") and "files, " in out[0]
    import json
    assert json.load(open(dst / "llama_jax.json"))["source"]["path"] == f"hf://{REPO}"


def test_missing_from_offline_cache_is_one_line(offline):
    with pytest.raises(HubError, match=r"hf://test-org/other: not in the Hugging Face cache .*HF_HUB_OFFLINE"):
        llama_jax.load("hf://test-org/other")


class _Hub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hub answers one for a gated (or missing) model without a token."""
    code, error_code = 401, "GatedRepo"

    def do_GET(self):
        self.send_response(self.code)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("X-Error-Message", "Access restricted. You must have access to it and be authenticated.")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("code,error_code,expect", [
    (401, "GatedRepo", r"hf://gated-org/model: a gated model; request access on https://huggingface.co/gated-org/"
                       r"model, then log in with `hf auth login` \(or set HF_TOKEN"),
    (404, "RepoNotFound", r"hf://gated-org/model: no such model on the Hub, or a private one.*HF_TOKEN"),
])
def test_gated_and_missing_models_say_how_to_get_access(code, error_code, expect, monkeypatch, tmp_path):
    handler = type("Handler", (_Hub,), {"code": code, "error_code": error_code})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored login
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(HubError, match=expect) as info:
            llama_jax.load("hf://gated-org/model")
        assert "\n" not in str(info.value)
    finally:
        server.shutdown()


def test_push_to_hub_dry_run_lists_the_export(offline, tmp_path, capsys):
    from huggingface_hub import CommitOperationAdd

    from llama_jax.io.convert import convert_to_llama_jax, main

    ckpt = convert_to_llama_jax(offline[1], str(tmp_path / "ckpt"), progress=False)
    out_dir = tmp_path / "hf-out"
    assert main(["--to-hf", ckpt, str(out_dir), "--no-progress", "--push-to-hub", "me/tiny-ft", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"wrote a Hugging Face directory (safetensors) to {out_dir}: ")
    assert any(line.strip().startswith("config.json ") for line in lines)
    assert lines[-1].startswith("dry run: would push ") and lines[-1].endswith("https://huggingface.co/me/tiny-ft")

    ops = hub.push_folder(str(out_dir), "me/tiny-ft", dry_run=True, log=lambda _: None)
    assert all(isinstance(op, CommitOperationAdd) for op in ops)
    assert sorted(op.path_in_repo for op in ops) == sorted(os.listdir(out_dir))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.model"} <= {op.path_in_repo for op in ops}
