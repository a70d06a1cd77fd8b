"""minicpm4_core.bench: timers (CPU paths), environment stamp, roofline ceilings, result layout and finder."""
import json
import re
import time
import warnings
from pathlib import Path

import pytest
import torch

from minicpm4_core import bench as B
from minicpm4_core.io import IntegrityError, read_json

pytestmark = pytest.mark.usefixtures('one_thread')     # tests/conftest.py
ROOT = Path(__file__).resolve().parents[1]


def test_cpu_time_measures_and_cycles():
    calls = []
    fns = [lambda i=i: (calls.append(i), time.sleep(0.003)) for i in range(3)]
    ms = B.cpu_time(fns, inner=6, reps=3, warmup=1)
    assert 3.0 <= ms < 60.0                            # a 3 ms sleep takes at least 3 ms
    assert calls[0] == 0 and calls.count(0) == 1 + 3 * 2 and set(calls) == {0, 1, 2}
    fast, slow = B.cpu_time(lambda: None, 10, 3), B.cpu_time(lambda: time.sleep(0.002), 2, 3)
    assert fast < slow
    with pytest.raises(ValueError, match='fns must be'): B.cpu_time([])
    with pytest.raises(ValueError, match='fns must be'): B.cpu_time([1, 2])


def test_event_time_cpu_budget_and_reps():
    n = []
    ms = B.event_time(lambda: (n.append(1), time.sleep(0.002)), budget_ms=1e6, min_reps=2, max_reps=4, warmup=1)
    assert len(n) == 1 + 4 and ms >= 2.0               # warm-up + max_reps (the budget allows more)
    n.clear()
    B.event_time(lambda: (n.append(1), time.sleep(0.002)), budget_ms=0.0, min_reps=2, max_reps=9, warmup=0)
    assert len(n) == 2                                 # no budget: min_reps
    assert B.device_time(lambda: time.sleep(0.001), 'cpu', inner=2, reps=2) >= 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU message is what is checked here')
def test_cuda_only_timer_says_so():
    with pytest.raises(RuntimeError, match='needs a CUDA device'): B.cuda_graph_time(lambda: None)
    assert B.l2_bytes('cpu') == 0 and B.copies_beyond_l2(1 << 20, 'cpu') == 1
    B.flush_l2('cpu')                                   # a no-op without an L2 to flush


def test_env_stamp_fields():
    s = B.env_stamp('cpu', note='x')
    for k in ('device', 'device_tag', 'torch', 'triton', 'cuda', 'python', 'platform', 'cpus', 'commit', 'dirty',
              'date'):
        assert k in s, k
    assert s['device_tag'] == 'cpu' and s['torch'] == torch.__version__ and s['note'] == 'x'
    assert re.fullmatch(r'\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00', s['date'])
    if (ROOT / '.git').exists():
        assert re.fullmatch(r'[0-9a-f]{40}', s['commit']) and isinstance(s['dirty'], bool)
    json.dumps(s)                                       # a stamp is JSON as it is
    with pytest.raises(ValueError, match='device must be'): B.env_stamp('not-a-device')


def test_git_commit_outside_a_repository(tmp_path):
    assert B.git_commit(tmp_path) == dict(commit=None, dirty=None)


def test_roofline_ceilings_cpu_small():
    c = B.roofline_ceilings('cpu', copy_bytes=1 << 22, matmul_n=64, budget_ms=5)
    assert set(c) == {'copy_GBps', 'bf16_matmul_TFLOPs'} and all(v > 0 for v in c.values())
    with pytest.raises(ValueError, match='copy_bytes'): B.roofline_ceilings('cpu', copy_bytes=0)


def test_write_and_find_newest(tmp_path):
    a = B.write_result(dict(v=torch.randn(1).item()), 'demo', 'r.json', 'cpu', date='2026-12-01', root=tmp_path)
    b = B.write_result(dict(v=2, p=tmp_path), 'demo', 'r.json', 'cpu', date='2026-12-03', root=tmp_path)
    c = B.write_result(dict(v=3), 'demo', 'r.json', 'cpu', date='2026-12-03-2', root=tmp_path)
    h = B.write_result(dict(v=4), 'demo', 'r.json', 'h200', date='2026-12-02', root=tmp_path, stamp=False)
    r = B.write_result(dict(v=5), 'demo', 'r.json', 'cpu', variant='real', date='2026-12-09', root=tmp_path)
    B.write_result(dict(v=6), 'demo', 'other.json', 'cpu', date='2026-12-10', root=tmp_path)
    assert a == tmp_path / 'demo' / 'cpu-2026-12-01' / 'r.json' and r.parent.name == 'cpu-real-2026-12-09'
    assert B.stored_result('demo', 'r.json', 'cpu', root=tmp_path) == c        # same day: the later run (-2)
    assert B.stored_result('demo', 'r.json', 'h200', root=tmp_path) == h
    assert B.stored_result('demo', 'r.json', 'cpu-real', root=tmp_path) == r
    assert B.stored_result('demo', 'r.json', root=tmp_path) == r               # newest of any device
    assert B.load_result('demo', 'r.json', 'cpu', root=tmp_path)['v'] == 3
    got = read_json(b)                                                          # round trip, stamped
    assert got['v'] == 2 and got['p'] == str(tmp_path) and got['env']['device_tag'] == 'cpu'
    assert 'env' not in read_json(h)
    assert not list(tmp_path.rglob('*.tmp*'))                                   # atomic: no leftovers


def test_finder_absent_and_bad_arguments(tmp_path):
    B.write_result(dict(v=1), 'demo', 'r.json', 'cpu', date='2026-12-01', root=tmp_path)
    with pytest.warns(UserWarning, match="no run of 'demo' holds 'x.json'.*cpu-2026-12-01"):
        assert B.stored_result('demo', 'x.json', root=tmp_path) is None
    with pytest.warns(UserWarning, match='runs there: none'):
        assert B.stored_result('nothing', 'r.json', root=tmp_path) is None
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert B.stored_result('demo', 'x.json', root=tmp_path, quiet=True) is None
    (tmp_path / 'demo' / 'cpu-2026-12-05').mkdir()
    (tmp_path / 'demo' / 'cpu-2026-12-05' / 'r.json').write_text('{not json')
    with pytest.raises(IntegrityError, match='r.json'): B.load_result('demo', 'r.json', root=tmp_path)
    with pytest.raises(ValueError, match='technique'): B.stored_result('../x', 'r.json', root=tmp_path)
    with pytest.raises(ValueError, match='name must'): B.write_result({}, 'demo', 'a/b.json', root=tmp_path)
    with pytest.raises(ValueError, match='obj must'): B.write_result([1], 'demo', 'r.json', root=tmp_path)
    with pytest.raises(ValueError, match='date must'): B.run_dir('demo', 'cpu', date='03/12/2026', root=tmp_path)
    with pytest.raises(ValueError, match='variant'): B.run_dir('demo', 'cpu', variant='Real Run', root=tmp_path)


def test_results_root_from_nbs_tutorials_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv(B.RESULTS_ENV, raising=False)
    for sub in ('nbs', 'tutorials', '.'):
        monkeypatch.chdir(ROOT / sub if (ROOT / sub).is_dir() else ROOT)
        assert B.results_root() == ROOT / 'kernels' / 'results'
    monkeypatch.chdir(tmp_path)                        # outside the repo: the folder beside the package, if any
    beside = B._package_dir().parent / 'kernels' / 'results'
    assert B.results_root() == (beside if beside.is_dir() else None)
    monkeypatch.setenv(B.RESULTS_ENV, str(tmp_path))
    assert B.results_root() == tmp_path


def test_stored_results_layout():
    "Every stored file sits under kernels/results/<technique>/<device>[-<variant>]-<date>/."
    base = ROOT / 'kernels' / 'results'
    files = [p for p in base.rglob('*') if p.is_file()]
    assert files
    for p in files:
        rel = p.relative_to(base).parts
        assert len(rel) >= 3 and re.fullmatch(r'[a-z0-9_]+', rel[0]) and B._RUN.match(rel[1]), p
    assert B.stored_result('infllmv2', 'bench_sparse_attention.json', 'h200', quiet=True) is not None


def test_kernel_times_counts_launches_per_call():
    "Per-op times from the profiler (CPU ops here): each fn's matmul once per call, the add twice per call of fns[1]."
    from minicpm4_core.bench import kernel_times
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    ks = kernel_times([lambda: a @ b, lambda: (a + b) + b], n=3, ndigits=3)
    assert ks['aten::mm']['per_step'] == pytest.approx(0.5) and ks['aten::add']['per_step'] == pytest.approx(1.0)
    assert all(v['us'] > 0 and v['us'] == round(v['us'], 3) for v in ks.values())


def test_synced_clock_accepts_a_device_or_its_name():
    from minicpm4_core.bench import synced_clock
    t0 = synced_clock('cpu')
    assert synced_clock(torch.device('cpu')) >= t0 > 0
