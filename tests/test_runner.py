import json
import os
import time
from pathlib import Path

import pytest

from minicpm4_core import runner as R
from minicpm4_core import cli as C

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
    assert res[1]["cell"] == "cell 0 (id c0, `raise RuntimeError('boom in notebook')`)"   # the failing cell, named
    assert "RuntimeError" in res[1]["traceback"] and "boom in notebook" in res[1]["traceback"]
    report = (tmp_path / "runs" / "ci" / "report.md").read_text()
    assert "1/2 notebooks ok" in report and "steps_seen=6" in report and "COMPLETE" in report
    assert "## Failures" in report and "02_bad.ipynb: failed in cell 0" in report
    assert (tmp_path / "runs" / "ci" / "report.html").exists()
    # the command line exits non-zero on failure
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert C.main(["run", "--profile", "ci", "--only", "01_ok"]) == 0
        assert C.main(["run", "--profile", "ci"]) == 1
    finally:
        os.chdir(cwd)


def _project(tmp_path, settings, notebooks):
    (tmp_path / "nbs").mkdir()
    (tmp_path / "settings.ini").write_text(settings)
    for name, cells in notebooks.items():
        (tmp_path / "nbs" / name).write_text(json.dumps(_nb(cells)))
    return tmp_path


def test_every_profile_parses():
    for name in R.profile_names(ROOT):
        p = R.load_profile(name, ROOT)
        assert p["notebook_timeout"] is None or p["notebook_timeout"] > 0, name


def test_malformed_setting_fails_before_any_notebook(tmp_path, capsys):
    root = _project(tmp_path, "[ci]\nprofile = 'ci'\nsteps = 3x\n", {"01_ok.ipynb": [("x = 1", {})]})
    with pytest.raises(ValueError, match=r"settings.ini \[ci\] steps = '3x' is not a Python literal"):
        R.run_notebooks("ci", root=root)
    assert not (root / "runs" / "ci" / "nbs__01_ok.ipynb").exists()
    (root / "settings.ini").write_text("[ci]\nprofile = 'ci'\nnotebook_timeout = -5\n")
    with pytest.raises(ValueError, match=r"\[ci\] notebook_timeout = -5"):
        R.load_profile("ci", root)
    assert C.main(["run", "--profile", "ci", "--root", str(root)]) == 2
    assert "notebook_timeout = -5" in capsys.readouterr().err


def test_timeout_stops_a_notebook_and_the_run_goes_on(tmp_path):
    root = _project(tmp_path, "[ci]\nprofile = 'ci'\nnotebook_timeout = 3\n", {
        "01_hang.ipynb": [("import time", {}), ("while True: time.sleep(0.1)", {})],
        "02_ok.ipynb": [("from minicpm4_core.runner import log_metrics\nlog_metrics(done=1)", {})]})
    t0 = time.time()
    res = R.run_notebooks("ci", root=root)
    assert [r["status"] for r in res] == ["timeout", "ok"] and time.time() - t0 < 60
    assert "notebook_timeout" in res[0]["error"] and "cell 1 (id c1, `while True" in res[0]["cell"]
    assert "02_ok" in res[1]["notebook"] and res[1]["metrics"] == {"done": 1}


def test_report_is_marked_in_progress_while_running(tmp_path, monkeypatch):
    import papermill as pm
    root = _project(tmp_path, "[ci]\nprofile = 'ci'\n", {"01_a.ipynb": [("x = 1", {})], "02_b.ipynb": [("x = 1", {})]})
    out = root / "runs" / "ci"; out.mkdir(parents=True)
    (out / "report.md").write_text("# old run\n\n2/2 notebooks ok\n")     # a previous run's report
    seen = []
    def fake_execute(src, dest, **kw):
        seen.append((out / "report.md").read_text())
        Path(dest).write_text("{}")
    monkeypatch.setattr(pm, "execute_notebook", fake_execute)
    R.run_notebooks("ci", root=root)
    assert all("IN PROGRESS" in s and "old run" not in s for s in seen) and "pending" in seen[0]
    final = (out / "report.md").read_text()
    assert "COMPLETE" in final and "IN PROGRESS" not in final
    assert json.loads((out / "summary.json").read_text())["state"] == "complete"


def test_ctrl_c_writes_an_interrupted_report(tmp_path):
    import signal
    import threading
    root = _project(tmp_path, "[ci]\nprofile = 'ci'\n", {
        "01_ok.ipynb": [("x = 1", {})],
        "02_slow.ipynb": [("import time", {}), ("time.sleep(60)", {})],
        "03_never.ipynb": [("x = 1", {})]})
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        def press_ctrl_c():  # once the slow notebook is running
            dest = root / "runs" / "ci" / "nbs__02_slow.ipynb"   # papermill rewrites it after every cell
            while True:   # wait until cell 0 has run, so the sleep of cell 1 is under way (slow kernels on a busy box)
                try:
                    if json.loads(dest.read_text())["cells"][0].get("execution_count"): break
                except (OSError, ValueError, KeyError, IndexError): pass
                time.sleep(0.1)
            time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=press_ctrl_c, daemon=True).start()
        assert C.main(["run", "--profile", "ci", "--root", str(root)]) == 130
    finally:
        signal.signal(signal.SIGINT, old)
    summary = json.loads((root / "runs" / "ci" / "summary.json").read_text())
    assert summary["state"] == "interrupted"
    assert [r["status"] for r in summary["results"]] == ["ok", "interrupted", "not run"]
    assert "cell 1 (id c1, `time.sleep(60)`)" in summary["results"][1]["cell"]
    assert "INTERRUPTED" in (root / "runs" / "ci" / "report.md").read_text()


def test_profiles_module_imports_no_torch_and_runner_reexports():
    import subprocess
    import sys
    code = ("import sys, minicpm4_core.profiles as P, minicpm4_core.runner as R; "
            "assert 'torch' not in sys.modules and 'papermill' not in sys.modules, 'heavy import'; "
            "assert R.log_metrics is P.log_metrics and R.load_profile is P.load_profile")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_quiet_run_injects_declared_parameters_and_writes_a_readable_report(tmp_path, capfd):
    plot = "import matplotlib.pyplot as plt\nplt.figure(figsize=(2, 2)); plt.plot([3, 1, 2]); plt.show()"
    root = _project(tmp_path, "[ci]\nprofile = 'ci'\nsteps = 7\nunused_key = 'x'\n", {
        "01_plot.ipynb": [("steps = 1", {"tags": ["parameters"]}), (plot, {}),
                          ("from minicpm4_core.profiles import log_metrics\n"
                           "log_metrics(loss=0.123456789, tokens=1234567, table=[{'bits': 4, 'err': 0.0312}, "
                           "{'bits': 3, 'err': 0.0917}], steps_seen=steps)", {})],
        "02_bad.ipynb": [("x = 1", {}), ("raise ValueError('bad value in cell two')", {})]})
    res = R.run_notebooks("ci", root=root)
    out = capfd.readouterr()
    log = out.out + out.err
    assert "unknown parameter" not in log.lower() and "over TCP" not in log, log   # quiet by default
    assert sum(line.startswith("[minicpm4 run] nbs/") for line in log.splitlines()) == 2   # one line per notebook
    run = root / "runs" / "ci"
    injected = json.loads((run / "nbs__01_plot.ipynb").read_text())["cells"][1]
    assert "injected-parameters" in injected["metadata"]["tags"]
    assert "steps = 7" in "".join(injected["source"]) and "unused_key" not in "".join(injected["source"])
    assert "injected-parameters" not in json.dumps(json.loads((run / "nbs__02_bad.ipynb").read_text())["cells"][0])
    assert res[0]["metrics"]["steps_seen"] == 7 and res[0]["html"] == "nbs__01_plot.html"
    assert (run / res[0]["html"]).exists() and len(res[0]["figures"]) == 1 and (run / res[0]["figures"][0]).exists()
    page = (run / "report.html").read_text()
    assert "href='nbs__01_plot.html'" in page and f"src='{res[0]['figures'][0]}'" in page    # linked, figure shown
    assert "0.1235" in page and "1,234,567" in page and "<th>bits</th>" in page        # numbers, not JSON dumps
    assert "0.123456789" not in page and '"bits"' not in page
    assert "bad value in cell two" in page and "cell 1 (id c1" in page and "ValueError" in page   # failure, traceback
    assert "python" in page and "papermill" in page                                    # machine and versions
    md = (run / "report.md").read_text()
    assert "loss=0.1235" in md and "table=table of 2 rows" in md and "## Failures" in md


def test_a_kernel_that_fails_to_start_is_started_once_more(tmp_path, monkeypatch, capsys):
    "Two shards can race for a kernel's ports: a start failure (no cell ran) gets one more start; nothing else does."
    import papermill as pm
    root = _project(tmp_path, "[ci]\nprofile = 'ci'\n", {"01_a.ipynb": [("x = 1", {})]})
    calls = []

    def flaky(fails, cell_ran=False):
        def fake_execute(src, dest, timeout_func=None, **kw):
            calls.append(src)
            if cell_ran: timeout_func({'id': 'c0', 'source': 'x = 1'})
            if len(calls) <= fails: raise RuntimeError("Kernel died before replying to kernel_info")
            Path(dest).write_text("{}")
        return fake_execute
    monkeypatch.setattr(pm, "execute_notebook", flaky(1))
    assert [r["status"] for r in R.run_notebooks("ci", root=root)] == ["ok"] and len(calls) == 2
    assert "did not start" in capsys.readouterr().err
    calls.clear(); monkeypatch.setattr(pm, "execute_notebook", flaky(2))       # twice: the notebook fails
    res = R.run_notebooks("ci", root=root)
    assert res[0]["status"] == "failed" and "kernel_info" in res[0]["error"] and len(calls) == 2
    calls.clear(); monkeypatch.setattr(pm, "execute_notebook", flaky(1, cell_ran=True))   # a cell ran: no retry
    assert R.run_notebooks("ci", root=root)[0]["status"] == "failed" and len(calls) == 1
