"""The planner (`python -m llama_jax.aot plan`): a tiny recipe on a 4-chip v5e slice, every candidate compiled
ahead of time with libtpu's compiler (no TPU), ranked by fit and projected step time; --top writes a recipe that
the training config loader accepts. Bad arguments are one-line errors: tests/hostile/cases_plan.py."""

import re

import pytest

pytest.importorskip("libtpu", reason="needs the TPU compiler wheel (requirements-test.txt: libtpu)")

from llama_jax.aot import hlo, plan  # noqa: E402
from llama_jax.aot.cli import main  # noqa: E402
from llama_jax.aot.projection import ring_traffic  # noqa: E402
from llama_jax.training import run_config  # noqa: E402

# tiny preset (4 query heads, 2 KV heads, D 64, 2 layers), 128 sequences of 64 tokens, no remat: with
# grad_accum 1 a chip holds the activations of 2048 tokens (11-12 MiB in all), with grad_accum 8 of 256 (7-8 MiB).
RECIPE = '''
from llama_jax.training.run_config import ModelSection, RunConfig

def get_config():
    return RunConfig(batch_size=128, seq_len=64, steps=3,
                     model=ModelSection(preset="tiny", dtype="bfloat16", remat="none"))
'''
HBM_GIB = "0.0093"  # judged against 9.5 MiB per chip: grad_accum 8 fits, grad_accum 1 does not
ARGS = ["--topology", "v5e:2x2", "--remat", "none", "--grad-accum", "1,8,128", "--meshes", "1x4x1,1x2x2,2x2x1,1x1x4",
        "--hbm-gib", HBM_GIB, "--jobs", "1", "--top", "1"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("plan")
    (tmp / "tiny.py").write_text(RECIPE)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["plan", "--config", str(tmp / "tiny.py"), *ARGS, "--out", str(tmp / "plans")])
    return code, out.getvalue(), tmp


def _rows(text):
    """The table's rows: [(rank, mesh, grad_accum, remat, fits, projected step)]."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 13 and cells[0].isdigit():
            rows.append((int(cells[0]), cells[1], int(cells[2]), cells[3], cells[4], cells[10]))
    return rows


def _ms(text):
    return float(text[:-2]) / 1e3 if text.endswith("ms") else float(text)


def test_ranks_fits_first_then_by_projected_step_time(planned):
    code, text, _ = planned
    assert code == 0, text
    rows = _rows(text)
    fits = [r for r in rows if r[4] == "yes"]
    refused = [r for r in rows if r[4] == "DOES NOT FIT"]
    assert len(fits) >= 3 and {r[2] for r in fits} == {8}, text
    assert refused and {r[2] for r in refused} == {1}, text  # the big micro-batch is refused
    assert [r[0] for r in fits] == list(range(1, len(fits) + 1))  # fits rank first
    steps = [_ms(r[5]) for r in fits]
    assert steps == sorted(steps) and all(s > 0 for s in steps)
    assert "PROJECTION" in text and "measured" not in text.lower()


def test_skips_trivially_invalid_candidates_and_counts_them(planned):
    _, text, _ = planned
    # tensor 4 does not divide the 2 KV heads: 3 grad_accum values; grad_accum 128 leaves 1 sequence per
    # micro-batch, which does not split over data x fsdp = 4 or 2 (3 meshes)
    assert "2 tensor does not divide the query and KV heads" not in text
    assert "3 tensor does not divide the query and KV heads" in text
    assert "3 micro-batch not divisible by data × fsdp" in text
    assert not any(r[1] == "(1, 1, 4)" or r[2] == 128 for r in _rows(text))


def test_top_recipe_loads_with_the_planned_settings(planned):
    _, text, tmp = planned
    path = re.search(r"recipe: (\S+)", text).group(1)
    cfg = run_config.build(path)  # what train.py --config does
    best = _rows(text)[0]
    assert f"({cfg.mesh.data}, {cfg.mesh.fsdp}, {cfg.mesh.tensor})" == best[1]
    assert (cfg.grad_accum, cfg.model.remat, cfg.batch_size, cfg.seq_len) == (8, "none", 128, 64)
    assert cfg.steps == 3 and cfg.model.preset == "tiny"  # everything else is the recipe's
    assert "PROJECTION" in open(path).read()


def test_budget_leaves_candidates_uncompiled(tmp_path, capsys):
    (tmp_path / "tiny.py").write_text(RECIPE)
    code = main(["plan", "--config", str(tmp_path / "tiny.py"), "--topology", "v5e:2x2", "--remat", "none",
                 "--grad-accum", "8", "--budget-s", "0", "--jobs", "1"])
    text = capsys.readouterr().out
    assert code == 1 and text.count("not compiled (budget)") >= 5


def test_ring_traffic_and_enumeration():
    mesh = {"data": 1, "fsdp": 4, "tensor": 2}
    c = lambda kind, axes: hlo.Collective(kind, axes, 1000, 2, "", "")  # noqa: E731
    assert ring_traffic(c("all-gather", ("fsdp",)), mesh) == pytest.approx(2000 * 3 / 4)
    assert ring_traffic(c("all-reduce", ("tensor",)), mesh) == pytest.approx(2000 * 2 * 1 / 2)
    assert ring_traffic(c("all-reduce", ("data",)), mesh) == 0
    cands, skipped = plan.enumerate_candidates(8, 8, 8, 16, grad_accums=[1, 2], remats=["full"])
    meshes = {(x.data, x.fsdp, x.tensor) for x in cands}
    assert all(d * f * t == 8 for d, f, t in meshes) and (1, 8, 1) in meshes and (1, 1, 8) in meshes
    assert not skipped


@pytest.mark.slow
def test_worker_processes_give_the_in_process_numbers(planned, capsys):
    """--jobs 2: the same candidates compiled in two spawned workers give the same memory as in-process."""
    _, text, tmp = planned
    code = main(["plan", "--config", str(tmp / "tiny.py"), *ARGS[:-4], "--jobs", "2", "--meshes", "1x4x1,1x2x2",
                 "--grad-accum", "8"])
    workers = capsys.readouterr().out
    assert code == 0
    mem = lambda t: {(r[1], r[2]): line.split("|")[6] for r in _rows(t) for line in t.splitlines()  # noqa: E731
                     if line.startswith(f"| {r[0]} |")}
    got = mem(workers)
    assert len(got) == 2 and all(got[k] == mem(text)[k] for k in got)
