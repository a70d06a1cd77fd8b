"""Every notebook of nbs/ and tutorials/ runs end-to-end through the runner under the `ci` profile."""
import os
from pathlib import Path

import pytest

from minicpm4_core import runner as R

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = [p.stem for p in R.list_notebooks(ROOT)]


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    # the main job runs without the Triton interpreter; the notebooks pick their CPU paths themselves
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        results = R.run_notebooks("ci", root=ROOT, out_dir=tmp_path_factory.mktemp("runs_ci"))
    finally:
        if old is not None: os.environ["TRITON_INTERPRET"] = old
    return {Path(r["notebook"]).stem: r for r in results}


@pytest.mark.notebooks
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_under_ci(ci_run, name):
    r = ci_run[name]
    assert r["status"] == "ok", f"{r['notebook']} failed: {r['error']}"


@pytest.mark.notebooks
def test_training_beats_unigram_entropy(ci_run):
    m = ci_run["03_train"]["metrics"]
    assert m["final_eval_loss"] < m["unigram_entropy"] - 0.5
