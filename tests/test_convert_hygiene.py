"""What an interrupted conversion leaves beside DST is cleaned up by the next run for the same DST (a killed
run's previous output put back first), and links inside the source folder still copy."""

import os

import pytest

from hostile.fixtures import tiny_hf_dir
from llama_jax.errors import ConversionError
from llama_jax.io.convert import convert_to_llama_jax


def _leftovers(parent):
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n)


def test_stale_tmp_and_old_are_removed(tmp_path):
    src = tiny_hf_dir(tmp_path / "src")
    (tmp_path / ".dst.tmp-k1ll3d" / "params").mkdir(parents=True)  # a run killed while writing
    (tmp_path / ".dst.old-k1ll3d" / "x").mkdir(parents=True)  # one killed after moving the old output aside...
    (tmp_path / "dst").mkdir()  # ...and its new output in place
    (tmp_path / ".other.tmp-keep").mkdir()  # another DST's: not ours to remove
    convert_to_llama_jax(src, tmp_path / "dst", force=True, progress=False)
    assert _leftovers(tmp_path) == [".other.tmp-keep"]
    assert (tmp_path / "dst" / "llama_jax.json").is_file()


def test_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    src = tiny_hf_dir(tmp_path / "src")
    convert_to_llama_jax(src, tmp_path / "first", progress=False)
    os.makedirs(tmp_path / ".dst.old-k1ll3d")
    os.rename(tmp_path / "first", tmp_path / ".dst.old-k1ll3d" / "x")  # killed between the two renames
    with pytest.raises(ConversionError, match="already exists and is not empty; pass --force"):
        convert_to_llama_jax(src, tmp_path / "dst", progress=False)
    assert (tmp_path / "dst" / "llama_jax.json").is_file() and _leftovers(tmp_path) == []


def test_a_link_inside_the_source_folder_is_copied(tmp_path):
    src = tiny_hf_dir(tmp_path / "src")
    (src / "files").mkdir()
    (src / "files" / "config.json").write_text('{"add_bos_token": true}')
    os.symlink("files/config.json", src / "tokenizer_config.json")
    convert_to_llama_jax(src, tmp_path / "dst", progress=False)
    assert (tmp_path / "dst" / "tokenizer_config.json").read_text() == '{"add_bos_token": true}'
