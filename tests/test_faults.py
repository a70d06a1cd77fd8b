"""Fault probes of training checkpoints and safe files (issue 14): kills, Ctrl-C, full disk, read-only targets,
corrupt files, mismatched resumes and NaN. Every probe checks that nothing is lost and nothing is silently wrong.

The kill and disk probes run training in child processes (one thread each, run in parallel); everything else runs
in this process on a 2-layer, hidden-64 model with random token rows."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from minicpm4_core import io as IO
from minicpm4_core import train as T
from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.model import MiniCPM4ForCausalLM
from minicpm4_core.train import NonFiniteError, TrainConfig, check_resume, train

HERE = Path(__file__).resolve().parent
V, STEPS, EVERY = 256, 8, 2


def make_rows(n=64, t=33, seed=0):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return MiniCPM4ForCausalLM(MiniCPM4Config.tiny(**{**dict(vocab_size=V, num_hidden_layers=2, hidden_size=64,
                                                              intermediate_size=128, dim_model_base=16, mtp=True), **kw}))


def make_cfg(ckpt=None, **kw):
    return TrainConfig(**{**dict(steps=STEPS, batch_size=4, progress=False, ckpt_dir=None if ckpt is None else str(ckpt),
                                 ckpt_every=EVERY, eval_every=3, eval_batches=1), **kw})


def valid_rows():
    return make_rows(8, 33, seed=1)


def train_until(ck, n, **kw):
    "Run make_cfg(ck) but stop after n steps as a Ctrl-C would (the checkpoint then has the full run's schedule)."
    orig = T.D.batches
    def batches(*a):
        it = orig(*a)
        for _ in range(n): yield next(it)
        raise KeyboardInterrupt
    T.D.batches = batches
    try: return train(make_model(), make_rows(), make_cfg(ck, **kw))
    finally: T.D.batches = orig


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def siblings(ck: Path):
    "Hidden temporary/old siblings of a checkpoint folder (none may be left behind)."
    return sorted(p.name for p in ck.parent.glob(f".{ck.name}.*"))


@pytest.fixture(scope="module")
def reference(one_thread):
    "An uninterrupted run: final model and history."
    m = make_model()
    res = train(m, make_rows(), make_cfg(), valid_rows())
    return m, res.history


@pytest.fixture
def real_sigint():
    "SIGINT raises KeyboardInterrupt in this test even if the runner of pytest ignores it (background jobs do)."
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def _sigint(): os.kill(os.getpid(), signal.SIGINT)


# ---------------------------------------------------------------------------------------------------------------
# Kills, a full disk and a read-only target, in child processes. One child imports torch once and forks one process
# per probe (imports dominate the time); each probe process trains and is SIGKILLed at its point, or runs the
# disk probes. The test process then resumes each killed run and compares with an uninterrupted one.

CHILD = r"""
import json, os, resource, signal, sys, traceback
from pathlib import Path
import torch
import torch._dynamo  # the first optimizer imports it (seconds): once here, not in every fork
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from test_faults import make_model, make_rows, make_cfg, valid_rows, train_until, KILLS
import minicpm4_core.train as T, minicpm4_core.io as IO, minicpm4_core.data as D
base = Path(sys.argv[1])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

def on_call(owner, name, n, before=True, cond=lambda *a, **k: True):
    "Kill this process at the n-th call of owner.name that satisfies cond (before or after the real call)."
    orig, count = getattr(owner, name), [0]
    def wrapper(*a, **k):
        if cond(*a, **k):
            count[0] += 1
            if count[0] == n and before: die()
        out = orig(*a, **k)
        if count[0] == n and not before: die()
        return out
    setattr(owner, name, wrapper)

def kill_probe(mode, ck):
    if mode == 'opt_step': on_call(torch.optim.AdamW, 'step', 5)                  # inside step 4 (ckpt at 4 exists)
    elif mode == 'ckpt_weights': on_call(T, 'save_pretrained', 2, before=False)   # save of step 4: weights only
    elif mode == 'ckpt_no_manifest': on_call(T, 'write_manifest', 3)              # save of step 6: all but manifest
    elif mode == 'swap_fallback':                                                 # save of step 4, between renames
        IO._use_exchange = False
        on_call(os, 'replace', 2, cond=lambda src, dst, *a, **k: Path(dst) == ck)
    elif mode == 'after_swap':                                                    # save of step 4, old not deleted
        def old_step2(p, *a, **k):
            m = Path(p) / 'manifest.json'
            return '.tmp-' in Path(p).name and m.exists() and json.loads(m.read_text())['step'] == 2
        on_call(IO.shutil, 'rmtree', 1, cond=old_step2)
    elif mode == 'external':                                                      # SIGKILL from the test process
        orig = D.batches
        def batches(*a):
            for i, b in enumerate(orig(*a)):
                print(f'{os.getpid()} batch {i}', flush=True)
                if i >= 5: import time; time.sleep(0.05)
                yield b
        D.batches = batches
    T.train(make_model(), make_rows(), make_cfg(ck), valid_rows())

def disk_probe(ck):
    train_until(ck, 4)                                            # a good checkpoint at step 4
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    out = {}
    for name, limit in [('weights', 100_000), ('trainer_state', 800_000)]:  # model.safetensors ~0.55 MB, state ~1.1 MB
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try: T.train(make_model(), make_rows(), make_cfg(ck), resume_from=ck); out[name] = 'no error'
        except OSError as e: out[name] = str(e)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    for q in [ck, *ck.rglob('*')]: os.chmod(q, 0o755 if q.is_dir() else 0o644)   # readable by anyone
    os.chmod(ck.parent, 0o555)
    if os.geteuid() == 0: os.setgid(65534); os.setuid(65534)          # root ignores permissions: become nobody
    try: T.train(make_model(), make_rows(), make_cfg(ck), resume_from=ck); out['read_only'] = 'no error'
    except OSError as e: out['read_only'] = str(e)
    print('DISK ' + json.dumps(out), flush=True)

pids = {}
for mode in [*KILLS, 'disk']:
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            if mode == 'disk': disk_probe(base / 'disk' / 'ckpt')
            else: kill_probe(mode, base / mode / 'ckpt')
            code = 0
        except BaseException:
            traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush(); os._exit(code)
    pids[pid] = mode
status = {}
for _ in pids:
    pid, st = os.waitpid(-1, 0)
    status[pids[pid]] = os.waitstatus_to_exitcode(st)
print('STATUS ' + json.dumps(status), flush=True)
"""

KILLS = {'opt_step': 4, 'ckpt_weights': 2, 'ckpt_no_manifest': 4, 'swap_fallback': 2, 'after_swap': 4, 'external': None}


@pytest.fixture(scope="module")
def child_probes():
    "Run CHILD once; returns (base folder, exit status per probe, disk probe messages)."
    base = Path(tempfile.mkdtemp(prefix='faults_'))   # world-readable: the read-only probe runs unprivileged
    os.chmod(base, 0o755)
    for m in [*KILLS, 'disk']: (base / m).mkdir(); os.chmod(base / m, 0o755)
    (base / 'child.py').write_text(CHILD)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(HERE.parent))
    p = subprocess.Popen([sys.executable, str(base / 'child.py'), str(base), str(HERE)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    status, disk, killed = None, None, False
    try:
        for line in p.stdout:
            if ' batch 5' in line and not killed:           # the external kill, once step 5 is under way
                os.kill(int(line.split()[0]), signal.SIGKILL); killed = True
            elif line.startswith('STATUS '): status = json.loads(line[7:])
            elif line.startswith('DISK '): disk = json.loads(line[5:])
        err = p.stderr.read(); p.wait(timeout=120)
        assert p.returncode == 0 and status is not None, f"child failed: {err[-3000:]}"
        yield base, status, disk, err
    finally:
        os.chmod(base / 'disk', 0o755)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("mode", list(KILLS))
def test_kill_at_any_point_then_resume_is_bit_identical(mode, child_probes, reference):
    base, status, _, err = child_probes
    assert status[mode] == -signal.SIGKILL, f"{mode}: the process was not killed (exit {status[mode]}): {err[-2000:]}"
    ck = base / mode / 'ckpt'
    st = check_resume(ck, make_model(), make_cfg(ck))  # also completes or undoes a half-done swap
    if KILLS[mode] is not None: assert st['step'] == KILLS[mode]
    model = make_model(seed=123)  # another init: everything must come from the checkpoint
    res = train(model, make_rows(), make_cfg(ck), valid_rows(), resume_from=ck)
    ref_model, ref_hist = reference
    assert same_weights(model, ref_model), "resumed weights differ from the uninterrupted run"
    assert res.history['step'] == list(range(STEPS)), "a step was repeated or skipped"
    assert res.history['loss'] == ref_hist['loss'] and res.history['eval_step'] == ref_hist['eval_step']
    assert siblings(ck) == [], f"left {siblings(ck)}"


def test_full_disk_and_read_only_keep_the_previous_checkpoint(child_probes, reference):
    base, status, msgs, err = child_probes
    assert status['disk'] == 0 and msgs is not None, err[-3000:]
    ck = base / 'disk' / 'ckpt'
    for name, msg in msgs.items():
        assert str(ck) in msg and 'unchanged' in msg, f"{name}: {msg}"
    assert 'File too large' in msgs['weights'] and 'File too large' in msgs['trainer_state']
    assert 'Permission denied' in msgs['read_only']
    os.chmod(ck.parent, 0o755)
    assert siblings(ck) == []
    assert check_resume(ck, make_model(), make_cfg(ck))['step'] == 4
    model = make_model(seed=3)
    train(model, make_rows(), make_cfg(ck), resume_from=ck)     # the survivor resumes to the same result
    assert same_weights(model, reference[0])


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C at several points of a step, delivered as a real SIGINT.

def _patch_once(monkeypatch, owner, name, before=True):
    orig, fired = getattr(owner, name), []
    def wrapper(*a, **k):
        if not fired and before: fired.append(1); _sigint()
        out = orig(*a, **k)
        if not fired and not before: fired.append(1); _sigint()
        return out
    monkeypatch.setattr(owner, name, wrapper)


def _after_calls(monkeypatch, owner, name, n):
    "SIGINT at the start of the n-th call."
    orig, count = getattr(owner, name), [0]
    def wrapper(*a, **k):
        count[0] += 1
        if count[0] == n: _sigint()
        return orig(*a, **k)
    monkeypatch.setattr(owner, name, wrapper)


SIGINT_POINTS = {  # where: (how to patch, steps done when the checkpoint is written)
    'eval after step 3': (lambda mp: _after_calls(mp, T, 'eval_loss', 1), 3),          # the case of the issue
    'inside optimizer step 5': (lambda mp: _after_calls(mp, torch.optim.AdamW, 'step', 5), 5),  # held until done
    'forward of step 3': (lambda mp: _after_calls(mp, T, 'lm_loss', 5), 3),  # calls: 3 steps, 1 eval, then this
    'writing checkpoint 2': (lambda mp: _after_calls(mp, T, 'write_manifest', 2), 4),
    'swapping checkpoint 2': (lambda mp: _after_calls(mp, IO, '_exchange', 1), 4),  # the first save has no swap
}


@pytest.mark.parametrize("point", list(SIGINT_POINTS))
def test_ctrl_c_never_repeats_or_skips_a_step(point, tmp_path, reference, real_sigint, monkeypatch):
    patch, want = SIGINT_POINTS[point]
    ck = tmp_path / 'ckpt'
    with monkeypatch.context() as mp:
        patch(mp)
        res = train(make_model(), make_rows(), make_cfg(ck), valid_rows())
    assert res.interrupted and len(res.history['step']) == want
    assert check_resume(ck, make_model(), make_cfg(ck))['step'] == want
    model = make_model(seed=7)
    res = train(model, make_rows(), make_cfg(ck), valid_rows(), resume_from=ck)
    ref_model, ref_hist = reference
    assert same_weights(model, ref_model)
    assert res.history['step'] == list(range(STEPS)) and res.history['eval_step'] == ref_hist['eval_step']
    assert res.history['eval_loss'] == pytest.approx(ref_hist['eval_loss'], rel=1e-6)
    assert siblings(ck) == []


# ---------------------------------------------------------------------------------------------------------------
# Corrupt, truncated or crafted checkpoint files: refused, naming the file, before the model is touched.

@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory, one_thread):
    ck = tmp_path_factory.mktemp('good') / 'ckpt'
    train_until(ck, 4)
    return ck


def _truncate(p): p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p):
    b = bytearray(p.read_bytes()); b[len(b) // 2] ^= 0x55; p.write_bytes(bytes(b))


class _Evil:
    def __reduce__(self): return (os.system, ('echo pwned > /dev/null',))


def _crafted(ck):
    "A trainer_state.pt that would run code on a pickle load, with a manifest updated to match it."
    torch.save(dict(optimizer=_Evil(), rng={}), ck / 'trainer_state.pt')
    man = json.loads((ck / 'manifest.json').read_text())
    man['files']['trainer_state.pt'] = dict(bytes=(ck / 'trainer_state.pt').stat().st_size,
                                            sha256=IO.sha256_file(ck / 'trainer_state.pt'))
    (ck / 'manifest.json').write_text(json.dumps(man))


CORRUPTIONS = {  # name: (damage, file the error must name)
    'truncated safetensors': (lambda ck: _truncate(ck / 'model.safetensors'), 'model.safetensors'),
    'flipped byte in optimizer state': (lambda ck: _flip(ck / 'trainer_state.pt'), 'trainer_state.pt'),
    'truncated state json': (lambda ck: _truncate(ck / 'trainer_state.json'), 'trainer_state.json'),
    'missing config.json': (lambda ck: (ck / 'config.json').unlink(), 'config.json'),
    'missing manifest': (lambda ck: (ck / 'manifest.json').unlink(), 'manifest.json'),
    'corrupt manifest': (lambda ck: (ck / 'manifest.json').write_text('{"files": {'), 'manifest.json'),
    'pickle that runs code': (_crafted, 'trainer_state.pt'),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_damaged_checkpoint_is_refused_naming_the_file(kind, good_ckpt, tmp_path):
    damage, fname = CORRUPTIONS[kind]
    ck = tmp_path / 'ckpt'; shutil.copytree(good_ckpt, ck)
    damage(ck)
    model = make_model(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((IO.IntegrityError, FileNotFoundError)) as e:
        train(model, make_rows(), make_cfg(), resume_from=ck)
    assert fname in str(e.value) and str(ck) in str(e.value), str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model was changed"


def test_safe_loaders_name_the_file(tmp_path):
    p = tmp_path / 'x.pt'; torch.save({'w': torch.randn(3, 3)}, p); _truncate(p)
    with pytest.raises(IO.IntegrityError, match='x.pt'): IO.safe_torch_load(p)
    q = tmp_path / 'x.safetensors'; q.write_bytes(os.urandom(64))
    with pytest.raises(IO.IntegrityError, match='x.safetensors'): IO.load_safetensors_file(q)
    with pytest.raises(FileNotFoundError, match='nope.pt'): IO.safe_torch_load(tmp_path / 'nope.pt')
    (tmp_path / 'bad.json').write_bytes(b'\xff\xfe{')
    with pytest.raises(IO.IntegrityError, match='bad.json'): IO.read_json(tmp_path / 'bad.json')


# ---------------------------------------------------------------------------------------------------------------
# A resume that would change the run is refused, naming what changed; one that only extends the schedule is not.

MISMATCHES = {  # name: (cfg overrides, rows, model overrides, text the message must contain)
    'batch_size': (dict(batch_size=8), None, {}, 'batch_size=4'),
    'lr': (dict(lr=2e-2), None, {}, 'lr=0.01'),
    'seed': (dict(seed=1), None, {}, 'seed=0'),
    'warmup (past schedule)': (dict(warmup=3), None, {}, 'warmup'),
    'seq_len': ({}, make_rows(64, 17), {}, 'seq_len 32 vs 16'),
    'other rows': ({}, make_rows(seed=9), {}, 'other content'),
    'model width': ({}, None, dict(intermediate_size=192), 'intermediate_size'),
}


@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_mismatched_resume_is_refused(kind, good_ckpt):
    over, rows, mover, text = MISMATCHES[kind]
    model = make_model(seed=5, **mover)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match='resume_from') as e:
        train(model, make_rows() if rows is None else rows, make_cfg(**over), resume_from=good_ckpt)
    assert text in str(e.value), str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resume_allows_what_does_not_change_the_past(good_ckpt, tmp_path):
    # WSD branching: a stable trunk (decay=0, 4 steps) continued with a longer schedule whose decay starts later
    trunk = tmp_path / 'trunk'; train(make_model(), make_rows(), make_cfg(trunk, steps=4, decay=0, warmup=1))
    res = train(make_model(seed=2), make_rows(), make_cfg(steps=8, decay=2, warmup=1, eval_every=100),
                resume_from=trunk)
    assert res.history['step'] == list(range(8))
    # reporting fields may change freely; a run-defining one only when asked for
    train(make_model(seed=2), make_rows(), make_cfg(eval_every=1, eval_batches=2, ckpt_every=0), resume_from=good_ckpt)
    train(make_model(seed=2), make_rows(), make_cfg(lr=2e-2), resume_from=good_ckpt, allow_changes=('lr',))
    with pytest.raises(ValueError, match="allow_changes: unknown names \\['device'\\]"):
        train(make_model(seed=2), make_rows(), make_cfg(), resume_from=good_ckpt, allow_changes=('device',))


# ---------------------------------------------------------------------------------------------------------------
# NaN/Inf: training stops with a message and no checkpoint ever holds non-finite weights.

def test_diverging_run_stops_and_saves_no_nan(tmp_path):
    ck = tmp_path / 'ckpt'
    with pytest.raises(NonFiniteError, match=r'lr=1000000.0') as e:
        train(make_model(), make_rows(), make_cfg(ck, steps=30, lr=1e6, ckpt_every=1))
    assert 'stopped before the optimizer step' in str(e.value)
    st = check_resume(ck, make_model(), make_cfg(ck, steps=30, lr=1e6, ckpt_every=1))
    loaded = T.load_pretrained(ck)
    assert all(torch.isfinite(p).all() for p in loaded.parameters()), "a checkpoint holds non-finite weights"
    assert st['step'] >= 1 and f"at step {st['step']}" in str(e.value)


def test_nan_weight_is_named_and_nothing_is_saved(tmp_path):
    m = make_model()
    with torch.no_grad(): m.model.layers[1].self_attn.k_proj.weight[3, 5] = float('nan')
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        train(m, make_rows(), make_cfg(tmp_path / 'ckpt'))
    assert not (tmp_path / 'ckpt').exists()
    with pytest.raises(NonFiniteError, match='k_proj'):
        T.save_checkpoint(tmp_path / 'ckpt2', m, torch.optim.AdamW(m.parameters()), 0, T.TrainResult(), make_cfg())
    assert not (tmp_path / 'ckpt2').exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad input to train is refused up front, naming the argument.

@pytest.mark.parametrize("rows, text", [
    (make_rows().float(), 'integer token ids'),
    (make_rows() + V, r'\[256, 511\].*\[0, 256\)'),
    (make_rows()[0], r'rows must be \(N, seq_len \+ 1\)'),
    (make_rows(0, 33), r'N >= 1'),
])
def test_train_rejects_bad_rows(rows, text):
    with pytest.raises(ValueError, match=text):
        train(make_model(), rows, make_cfg())


@pytest.mark.parametrize("over, text", [(dict(steps=0), 'TrainConfig.steps'), (dict(lr=float('nan')), 'TrainConfig.lr'),
                                        (dict(batch_size=0), 'TrainConfig.batch_size'),
                                        (dict(ckpt_every=-1), 'TrainConfig.ckpt_every'),
                                        (dict(decay_shape='step'), 'shape must be one of')])
def test_train_rejects_bad_config(over, text):
    with pytest.raises(ValueError, match=text):
        train(make_model(), make_rows(), make_cfg(**over))


# ---------------------------------------------------------------------------------------------------------------
# The atomic writers themselves.

def test_atomic_file_write_keeps_old_content_on_failure(tmp_path):
    p = tmp_path / 'r.json'
    IO.atomic_write_json(p, {'v': 1})
    with pytest.raises(TypeError):
        IO.atomic_write_json(p, {'v': object()})            # fails before touching the disk
    with pytest.raises(RuntimeError):
        with IO.atomic_path(p) as tmp:
            tmp.write_text('{"v": 2, "tor'); raise RuntimeError('crash while writing')
    assert json.loads(p.read_text()) == {'v': 1} and sorted(x.name for x in tmp_path.iterdir()) == ['r.json']


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_folder_swaps_whole_or_not_at_all(tmp_path, monkeypatch, exchange):
    monkeypatch.setattr(IO, '_use_exchange', exchange)
    f = tmp_path / 'model'
    for v in (b'1', b'2'):
        with IO.atomic_folder(f) as t:
            (t / 'a.bin').write_bytes(v * 10); (t / 'b.bin').write_bytes(v)
            IO.write_manifest(t, step=int(v))
    assert IO.verify_manifest(f)['step'] == 2 and (f / 'a.bin').read_bytes() == b'2' * 10
    with pytest.raises(OSError, match=re.escape(str(f)) + ".*unchanged"):
        with IO.atomic_folder(f) as t:
            (t / 'a.bin').write_bytes(b'3'); raise OSError(28, 'No space left on device')
    assert IO.verify_manifest(f)['step'] == 2 and siblings(f) == []
    # a two-rename swap that died between the renames is undone by the next reader
    os.replace(f, tmp_path / '.model.old')
    assert IO.recover_folder(f) == f and IO.verify_manifest(f)['step'] == 2 and siblings(f) == []


def test_checkpoint_holds_the_rng_states_and_they_restore(tmp_path):
    # training draws no global random numbers, so the bit-identity probes above cannot see a lost RNG state: check it
    import random
    import numpy as np
    ck = tmp_path / 'ckpt'
    train_until(ck, 4)
    saved = IO.safe_torch_load(ck / 'trainer_state.pt')['rng']
    now = T.rng_state()
    assert torch.equal(saved['torch'], now['torch']) and saved['python'] == now['python']
    assert torch.equal(saved['numpy']['keys'], now['numpy']['keys'])
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    T.set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws
