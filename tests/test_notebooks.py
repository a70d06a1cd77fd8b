"""Every notebook of nbs/ and tutorials/ runs end-to-end through the runner under the `ci` profile."""
import os
from pathlib import Path

import pytest

from minicpm4_core import runner as R

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = [p.stem for p in R.list_notebooks(ROOT)]


# Seconds per notebook on the 2-core CI machine (last measured run); unlisted notebooks count 5 s. Only used to
# balance the two shards below, so a stale figure costs balance, never correctness.
# seconds per notebook in the last CI run on 2 cores (033df75, two shards side by side): only the balance matters
CI_SECONDS = {'30_modeltunnel': 70, '20_ultraclean': 63, '70_pgptq': 56, '10a_infllmv2_model': 54, '60_frspec': 33,
              '06_llama': 28, '08_distributed': 25, '40_chunked_rl': 22, '90_edge_bench': 20, '12_long_context': 19,
              '11_sparse_kernels': 18, '11c_sparse_prefill': 18, '50_bitcpm': 13, 'modeltunnel': 7, '71_w4a16_kernel': 6,
              '07_hf': 6, '80_engine': 16, 'engine': 9, 'model_mup': 5, 'bitcpm': 5, '51_ternary_kernel': 5,
              '63_sparse_spec': 4, '04_runner': 4, '10_infllmv2': 4, '11b_kernel_package': 4, '11d_fused_ops': 3,
              '61_static_decode': 4}
# both write <artifacts>/real: they share a shard so they never write it at the same time
SAME_SHARD = ('10a_infllmv2_model', '70_pgptq')


def shard_plan(paths):
    """Split the notebooks into a serial head and two shards that run side by side (CI has 2 cores).
    The head ends with 03_train, which writes the base model the later notebooks load from the shared artifacts
    folder; the rest is balanced by CI_SECONDS (longest first onto the lighter shard). Returns (head, a, b) as lists of
    'folder/name' strings, each in the runner's order."""
    names = [f'{p.parent.name}/{p.stem}' for p in paths]
    cut = next((i + 1 for i, n in enumerate(names) if n.endswith('/03_train')), 0)
    head, rest = names[:cut], names[cut:]
    cost = lambda n: CI_SECONDS.get(n.split('/')[-1], 5) + (1000 if n.split('/')[-1] in SAME_SHARD else 0)
    shards, load = ([], []), [0, 0]
    for n in sorted(rest, key=cost, reverse=True):
        i = 0 if n.split('/')[-1] in SAME_SHARD else int(load[1] < load[0])
        shards[i].append(n); load[i] += cost(n) % 1000
    order = {n: i for i, n in enumerate(names)}
    return head, *(sorted(s, key=order.get) for s in shards)


def _run(only, root, out, artifacts, threads=None):
    # every shard reads and writes one artifacts folder (the base model of 03_train): linked into its run folder
    if threads:
        # two shards on two cores: one thread per notebook kernel (the kernels inherit this environment); two
        # notebooks with two OpenMP threads each on two cores ran 2-6x slower than alone (measured in CI)
        for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"): os.environ[v] = str(threads)
    out.mkdir(parents=True, exist_ok=True)
    if artifacts != out / 'artifacts': (out / 'artifacts').symlink_to(artifacts, target_is_directory=True)
    return R.run_notebooks("ci", only=only, root=root, out_dir=out)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    """Run every notebook under `ci`: the head serially, then two shards in two processes at once."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    # the main job runs without the Triton interpreter; the notebooks pick their CPU paths themselves
    old = os.environ.pop("TRITON_INTERPRET", None)
    base = tmp_path_factory.mktemp("runs_ci")
    head, a, b = shard_plan(R.list_notebooks(ROOT))
    try:
        results = _run(head, ROOT, base / "head", base / "head" / "artifacts") if head else []
        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(_run, s, ROOT, base / f"shard{i}", base / "head" / "artifacts", 1)
                    for i, s in enumerate((a, b)) if s]
            for f in futs: results += f.result()
    finally:
        if old is not None: os.environ["TRITON_INTERPRET"] = old
    return {Path(r["notebook"]).stem: r for r in results}


def test_shard_plan_covers_every_notebook_once():
    head, a, b = shard_plan(R.list_notebooks(ROOT))
    every = [f'{p.parent.name}/{p.stem}' for p in R.list_notebooks(ROOT)]
    assert sorted(head + a + b) == sorted(every) and len(head + a + b) == len(every)
    assert head[-1] == 'nbs/03_train'
    assert sum(n.split('/')[-1] in SAME_SHARD for n in a) in (0, len(SAME_SHARD))


@pytest.mark.notebooks
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_under_ci(ci_run, name):
    r = ci_run[name]
    assert r["status"] == "ok", f"{r['notebook']} failed: {r['error']}"


@pytest.mark.notebooks
def test_training_beats_unigram_entropy(ci_run):
    m = ci_run["03_train"]["metrics"]
    assert m["final_eval_loss"] < m["unigram_entropy"] - 0.5
