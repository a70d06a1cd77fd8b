import json
import os
from pathlib import Path

import pytest

from minicpm4_core import runner as R

ROOT = Path(__file__).resolve().parents[1]


def test_profiles():
    assert {"ci", "gpu", "edge"} <= set(R.profile_names(ROOT))
    ci = R.load_profile("ci", ROOT)
    assert ci["device"] == "cpu" and isinstance(ci["train_steps"], int)
    with pytest.raises(ValueError, match="unknown profile 'tpu'"):
        R.load_profile("tpu", ROOT)


def test_list_notebooks_order_and_filter():
    nbs = R.list_notebooks(ROOT)
    assert nbs[0].name == "index.ipynb"
    assert [p.name for p in R.list_notebooks(ROOT, only="03_train")] == ["03_train.ipynb"]
    with pytest.raises(ValueError, match="matches no notebook"):
        R.list_notebooks(ROOT, only="nope_nothing")


def test_readme_is_rendered_from_index():
    assert (ROOT / "README.md").read_text() == R.render_readme(ROOT / "nbs" / "index.ipynb"), \
        "README.md is stale: run `minicpm4 readme`"


def test_log_metrics_merges_into_file(tmp_path, monkeypatch):
    p = tmp_path / "m.json"
    monkeypatch.setenv("MINICPM4_METRICS", str(p))
    R.log_metrics(a=1)
    R.log_metrics(b=[1.5, 2])
    assert json.loads(p.read_text()) == {"a": 1, "b": [1.5, 2]}
    with pytest.raises(TypeError):
        R.log_metrics(bad=object())


def _nb(cells):
    return {"cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": meta,
                       "outputs": [], "source": src} for i, (src, meta) in enumerate(cells)],
            "metadata": {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}


def test_run_reports_success_metrics_and_failure(tmp_path):
    (tmp_path / "nbs").mkdir()
    (tmp_path / "settings.ini").write_text("[ci]\nprofile = 'ci'\nsteps = 3\n")
    ok = _nb([("steps = 1", {"tags": ["parameters"]}),
              ("from minicpm4_core.runner import log_metrics\nlog_metrics(steps_seen=steps * 2)", {})])
    bad = _nb([("raise RuntimeError('boom in notebook')", {})])
    (tmp_path / "nbs" / "01_ok.ipynb").write_text(json.dumps(ok))
    (tmp_path / "nbs" / "02_bad.ipynb").write_text(json.dumps(bad))
    res = R.run_notebooks("ci", root=tmp_path)
    assert [r["status"] for r in res] == ["ok", "failed"]
    assert res[0]["metrics"] == {"steps_seen": 6}          # the profile's parameter was injected
    assert "boom in notebook" in res[1]["error"]
    report = (tmp_path / "runs" / "ci" / "report.md").read_text()
    assert "1/2 notebooks ok" in report and "steps_seen=6" in report
    assert (tmp_path / "runs" / "ci" / "report.html").exists()
    # the command line exits non-zero on failure
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert R.main(["run", "--profile", "ci", "--only", "01_ok"]) == 0
        assert R.main(["run", "--profile", "ci"]) == 1
    finally:
        os.chdir(cwd)
