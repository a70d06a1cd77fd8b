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


# ===============================================================================================================
# Issue 14, second part: boundary checks, safe readers, validate-before-mutate transforms, atomic exports.
from minicpm4_core import checks as C  # noqa: E402
from minicpm4_core import data as D  # noqa: E402
from minicpm4_core import bitcpm as B  # noqa: E402
from minicpm4_core import pgptq as PQ  # noqa: E402

QV = 128   # vocabulary of the tiny models of the transform probes


def tiny(seed=0, **kw):
    "2 layers, hidden 64, intermediate 96: a group of 64 divides the attention inputs but not down_proj's."
    torch.manual_seed(seed)
    return MiniCPM4ForCausalLM(MiniCPM4Config.tiny(**{**dict(vocab_size=QV, num_hidden_layers=2, hidden_size=64,
                                                             intermediate_size=96, dim_model_base=16), **kw}))


def snapshot(m):
    "Every tensor and the type of every module: equal snapshots mean an unchanged model."
    return {k: v.detach().clone() for k, v in m.state_dict().items()}, [type(x).__name__ for x in m.modules()]


def unchanged(m, snap):
    sd, types = snapshot(m)
    return types == snap[1] and sd.keys() == snap[0].keys() and all(torch.equal(sd[k], snap[0][k]) for k in sd)


def qcalib(n=4, t=24, seed=0):
    return torch.randint(0, QV, (n, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- boundary checks
def test_check_ids_accepts_good_ids_and_names_bad_ones():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    assert C.check_ids(ids, 50) is ids and torch.equal(C.check_ids(ids[0].tolist(), 50), ids[0])
    with pytest.raises(TypeError, match=r"input_ids: token ids must be integers.*float32.*not rounded"):
        C.check_ids(ids.float() + 0.7, 50)
    with pytest.raises(TypeError, match="bool"): C.check_ids(ids > 3, 50)
    with pytest.raises(TypeError, match="prompt"): C.check_ids([[1.5, 2.0]], 50, 'prompt')
    with pytest.raises(ValueError, match=r"expected shape \(T,\) or \(batch, T\), got \(1, 3, 9\)"): C.check_ids(ids[None], 50)
    with pytest.raises(ValueError, match=r"empty \(shape \(3, 0\)\)"): C.check_ids(ids[:, :0], 50)
    i, j = int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(0, 9, (1,), generator=g))
    for v in (50, -1, 10**6):
        bad = ids.clone(); bad[i, j] = v
        with pytest.raises(IndexError, match=rf"\[0, vocab_size=50\); position \({i}, {j}\) holds {v}"):
            C.check_ids(bad, 50)


def test_check_attention_mask():
    ids = torch.randint(0, 9, (2, 6))
    m = torch.ones(2, 6, dtype=torch.long); m[1, :int(torch.randint(1, 5, (1,)))] = 0
    assert C.check_attention_mask(m, ids) is m and C.check_attention_mask(m.bool(), ids) is not None
    assert C.check_attention_mask(None, ids) is None and C.check_attention_mask(m.float(), ids) is not None
    assert C.check_attention_mask(torch.ones(2, 10), ids, total=10) is not None       # tokens after a cache of 4
    with pytest.raises(ValueError, match=r"0 \(padding\) or 1 \(token\); position \(0, 2\) holds 2"):
        bad = m.clone(); bad[0, 2] = 2; C.check_attention_mask(bad, ids)
    with pytest.raises(ValueError, match=r"expected shape \(2, 6\).*got \(2, 5\)"): C.check_attention_mask(m[:, 1:], ids)
    with pytest.raises(ValueError, match="row 1 is all zeros"):
        z = m.clone(); z[1] = 0; C.check_attention_mask(z, ids)
    with pytest.raises(TypeError, match="attention_mask"): C.check_attention_mask([[1] * 6] * 2, ids)


def test_check_length_and_check_finite():
    n = int(torch.randint(2, 100, (1,)))
    assert C.check_length(n, n) == n
    with pytest.raises(ValueError, match=rf"prompt = {n + 1} exceeds max_position_embeddings = {n}"):
        C.check_length(n + 1, n, 'prompt')
    with pytest.warns(UserWarning, match="strict=False"): C.check_length(n + 1, n, strict=False)
    x = torch.randn(2, 3, 7)
    assert C.check_finite(x) is x and C.check_finite(torch.arange(3)) is not None
    for v, nan in ((float('nan'), 1), (float('inf'), 0), (-float('inf'), 0)):
        y = x.clone(); y[1, 0, 4] = v
        with pytest.raises(C.NonFiniteError, match=rf"logits: 1 of 42 values are not finite \({nan} NaN\).*\(1, 0, 4\)"):
            C.check_finite(y, 'logits')


# ---------------------------------------------------------------------------------------------- io: folders, state dicts
def _folder(tmp_path, sharded):
    from safetensors.torch import save_file
    d = tmp_path / ('sharded' if sharded else 'single'); d.mkdir()
    sd = {'a.weight': torch.randn(4, 6), 'b.weight': torch.randn(5), 'c.bias': torch.randn(3, 2).half()}
    if sharded:
        save_file({k: sd[k] for k in ('a.weight',)}, d / 'model-00001-of-00002.safetensors')
        save_file({k: sd[k] for k in ('b.weight', 'c.bias')}, d / 'model-00002-of-00002.safetensors')
        wm = {'a.weight': 'model-00001-of-00002.safetensors', 'b.weight': 'model-00002-of-00002.safetensors',
              'c.bias': 'model-00002-of-00002.safetensors'}
        (d / 'model.safetensors.index.json').write_text(json.dumps({'metadata': {}, 'weight_map': wm}))
    else: save_file(sd, d / 'model.safetensors')
    return d, sd


def _set_index(d, f):
    p = d / 'model.safetensors.index.json'; j = json.loads(p.read_text()); f(j); p.write_text(json.dumps(j))


FOLDER_DAMAGE = {  # name: (sharded?, damage, text the message must contain)
    'truncated single file': (False, lambda d: _truncate(d / 'model.safetensors'), 'model.safetensors'),
    'index not JSON': (True, lambda d: (d / 'model.safetensors.index.json').write_text('{"weight_map": {'),
                       'model.safetensors.index.json is corrupt'),
    'index without weight_map': (True, lambda d: _set_index(d, lambda j: j.pop('weight_map')), "no 'weight_map'"),
    'shard missing': (True, lambda d: (d / 'model-00002-of-00002.safetensors').unlink(),
                      'model-00002-of-00002.safetensors is listed in'),
    'shard truncated': (True, lambda d: _truncate(d / 'model-00001-of-00002.safetensors'), 'model-00001-of-00002'),
    'tensor no shard holds': (True, lambda d: _set_index(d, lambda j: j['weight_map'].update(
        {'z.weight': 'model-00001-of-00002.safetensors'})), "no shard holds: ['z.weight']"),
    'shard outside the folder': (True, lambda d: _set_index(d, lambda j: j['weight_map'].update(
        {'a.weight': '../x.safetensors'})), 'outside the folder'),
}


@pytest.mark.parametrize("kind", list(FOLDER_DAMAGE))
def test_safetensors_folder_damage_names_the_file(kind, tmp_path):
    sharded, damage, text = FOLDER_DAMAGE[kind]
    d, sd = _folder(tmp_path, sharded)
    got = IO.load_safetensors_folder(d)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    damage(d)
    with pytest.raises((IO.IntegrityError, FileNotFoundError), match=re.escape(text)) as e:
        IO.load_safetensors_folder(d)
    assert str(d) in str(e.value)


def test_check_state_dict_shapes_keys_and_dtypes(tmp_path):
    import warnings
    f = tmp_path / 'model.safetensors'
    sd = {'w': torch.randn(3, 4), 'h': torch.randn(5).to(torch.bfloat16), 'n': torch.randint(0, 9, (2,))}
    want = {'w': ((3, 4), torch.float32), 'h': ((5,), torch.float32), 'n': ((2,), torch.int64)}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        out = IO.check_state_dict(sd, want, f)
    assert len(w) == 1 and 'h (bfloat16)' in str(w[0].message) and str(f) in str(w[0].message)
    assert out['h'].dtype == torch.float32 and torch.equal(out['h'], sd['h'].float()) and out['w'] is sd['w']
    with pytest.raises(IO.IntegrityError, match=rf"h in {re.escape(str(f))}: dtype torch.bfloat16, the model expects torch.float32"):
        IO.check_state_dict(sd, want, f, on_dtype='error')
    with pytest.raises(IO.IntegrityError, match=r"n in .*: dtype torch.float32, the model expects torch.int64"):
        IO.check_state_dict({**sd, 'n': torch.randn(2)}, want, f)
    with pytest.raises(IO.IntegrityError, match=r"w in .*: shape \(4, 3\), the model expects \(3, 4\)"):
        IO.check_state_dict({**sd, 'w': torch.randn(4, 3)}, want, f)
    with pytest.raises(IO.IntegrityError, match=r"missing \['n'\], unexpected \['x'\]"):
        IO.check_state_dict({'w': sd['w'], 'h': sd['h'], 'x': sd['n']}, want, f)
    assert IO.check_state_dict({'w': sd['w']}, want, strict=False).keys() == {'w'}


@pytest.mark.parametrize("text, match", [('{"hidden_size": ', 'is corrupt'), ('[1, 2]', 'not a JSON object'),
                                         ('{"hidden_size": "128"}', 'hidden_size must be an int'),
                                         ('{"num_attention_heads": 0}', 'num_attention_heads')])
def test_read_config_names_the_file(tmp_path, text, match):
    (tmp_path / 'config.json').write_text(text)
    with pytest.raises((ValueError, TypeError), match=re.escape(str(tmp_path / 'config.json')) + '.*' + match):
        IO.read_config(tmp_path)


# ---------------------------------------------------------------------------------------------- validate before mutating
BITLINEAR_BAD = {  # name: (kwargs, exception, text)
    'group 64 vs down_proj in 96': (dict(granularity=64), ValueError,
                                    r"granularity=64 does not divide the in_features of 2 layer\(s\).*mlp.down_proj \(in_features=96\).*nothing was converted"),
    'group 0': (dict(granularity=0), ValueError, 'group size must be >= 1'),
    'unknown granularity': (dict(granularity='per_row'), ValueError, "granularity='per_row'; accepted"),
    'bool granularity': (dict(granularity=True), ValueError, 'granularity=True'),
    'act_bits 4': (dict(act_bits=4), ValueError, 'act_bits=4; accepted'),
}


@pytest.mark.parametrize("kind", list(BITLINEAR_BAD))
def test_to_bitlinear_refuses_before_the_first_swap(kind):
    kw, exc, text = BITLINEAR_BAD[kind]
    m = tiny(); snap = snapshot(m)
    with pytest.raises(exc, match=text): B.to_bitlinear(m, **kw)
    assert unchanged(m, snap)


def test_to_bitlinear_twice_and_on_other_models():
    m = tiny(); B.to_bitlinear(m, 32)
    snap = snapshot(m)
    with pytest.raises(ValueError, match='already converted'): B.to_bitlinear(m)
    assert unchanged(m, snap)
    with pytest.raises(TypeError, match='nn.Module'): B.to_bitlinear('model')


def test_qat_experiment_refuses_a_granularity_before_training():
    rows = qcalib(8, 17)
    with pytest.raises(ValueError, match=r"granularity=64 does not divide the in_features of \['model.layers.0.mlp.down_proj'"):
        B.run_qat_experiment(tiny, rows, rows, B.QATExperiment(total_steps=10, granularity=64))


def _gen(calib):
    yield from calib.split(2)


QUANT_BAD = {  # name: (kwargs, calib, exception, text)
    'group 64 vs down_proj in 96 (pack)': (dict(group_size=64), None, ValueError,
                                           r"model.layers.0.mlp.down_proj \(in_features 96.*group_size=64"),
    'group not multiple of 8 (pack)': (dict(group_size=12), None, ValueError, 'group_size=12'),
    'group 0': (dict(group_size=0), None, ValueError, r'group_size=0; accepted'),
    'bits 9': (dict(bits=9), None, ValueError, r'bits=9; accepted'),
    'bits 8 packed': (dict(bits=8), None, ValueError, 'pack=True needs bits <= 4'),
    'method': (dict(method='awq'), None, ValueError, r"method='awq'; accepted"),
    'layer out of range': (dict(layers=[0, 5]), None, ValueError, r'layers=\[0, 5\].*\[0, 2\)'),
    'layer twice': (dict(layers=[1, 1]), None, ValueError, 'distinct'),
    'prefix negative': (dict(prefix=-1), None, ValueError, 'prefix=-1'),
    'damp 1': (dict(damp=1.0), None, ValueError, 'damp=1.0'),
    'batch_size 0': (dict(batch_size=0), None, ValueError, 'batch_size=0'),
    'sym as a string': (dict(sym='yes'), None, TypeError, "sym='yes'"),
    'calib ids out of vocabulary': ({}, qcalib() + QV, IndexError, r'calib batch 0: token ids must lie in \[0, vocab_size=128\)'),
    'calib float ids': ({}, qcalib().float(), TypeError, 'calib batch 0: token ids must be integers'),
    'calib 3-D': ({}, qcalib()[None], ValueError, r'calib must be a LongTensor \(n, T\)'),
    'calib generator': ({}, 'gen', TypeError, 'one-shot iterator'),
    'calib empty list': ({}, [], ValueError, 'calib is empty'),
    'calib not tensors': ({}, [[1, 2, 3]], ValueError, 'calib batch 0: expected a non-empty'),
    'P-GPTQ calib no longer than prefix': (dict(prefix=4), qcalib(4, 4), ValueError,
                                           r'prefix=4 leaves no calibration position: the longest calibration sequence has 4'),
    'smoothing calib no longer than prefix': (dict(method='rtn', smooth=True, prefix=6), qcalib(4, 5), ValueError,
                                              'prefix=6 leaves no calibration position'),
}


@pytest.mark.parametrize("kind", list(QUANT_BAD))
def test_quantize_model_refuses_before_changing_anything(kind):
    kw, calib, exc, text = QUANT_BAD[kind]
    calib = qcalib() if calib is None else _gen(qcalib()) if calib == 'gen' else calib
    m = tiny(); snap = snapshot(m)
    with pytest.raises(exc, match=text):
        PQ.quantize_model(m, calib, **{**dict(group_size=32, progress=False), **kw})
    assert unchanged(m, snap) and not hasattr(m, 'quant_config')


def test_pgptq_short_calibration_never_zeroes_a_layer():
    # the lower-level pieces refuse an empty Hessian too, instead of returning all-zero weights
    h = PQ.PrefixHessian(16, prefix=4)
    h.add(torch.randn(3, 4, 16))
    assert h.n_rest == 0
    with pytest.raises(ValueError, match='H is all zeros'):
        PQ.gptq_quantize(torch.randn(8, 16), h.hessian(True), 4, 8)
    # calibration longer than the prefix (even by one position) works and keeps the weights non-zero
    m, _ = PQ.quantize_model(tiny(), qcalib(4, 5), prefix=4, group_size=32, progress=False, pack=False, layers=[0])
    assert all(p.abs().sum() > 0 for n, p in m.named_parameters() if 'layers.0.' in n)


def test_quantize_interrupted_half_way_says_so_and_cannot_be_saved(tmp_path):
    m = tiny()
    def boom(mod, args): raise KeyboardInterrupt
    m.model.layers[1].self_attn.q_proj.register_forward_pre_hook(boom)   # Ctrl-C once layer 0 is quantized
    with pytest.raises(KeyboardInterrupt) as e:
        PQ.quantize_model(m, qcalib(), group_size=32, progress=False)
    assert any('partly quantized' in n for n in getattr(e.value, '__notes__', []))
    with pytest.raises(ValueError, match='interrupted'): PQ.save_quantized(m, tmp_path / 'q')
    assert not (tmp_path / 'q').exists()


# ---------------------------------------------------------------------------------------------- quantized / ternary exports
def ternary_model(seed=0):
    m = tiny(seed); B.to_bitlinear(m, 32); return m.eval()


def quant_model(seed=0):
    return PQ.quantize_model(tiny(seed), qcalib(seed=seed), group_size=32, progress=False)[0]


EXPORTS = {  # kind: (make a model, save, load)
    'ternary': (ternary_model, B.export_ternary, B.load_ternary),
    'w4a16': (quant_model, PQ.save_quantized, PQ.load_quantized),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, one_thread):
    "A good export of each kind (seed 0) and the manifest of its files."
    base = tmp_path_factory.mktemp('exports')
    os.chmod(base, 0o755)
    out = {}
    for kind, (make, save, _) in EXPORTS.items():
        save(make(), base / kind)
        out[kind] = (base / kind, IO.verify_manifest(base / kind)['files'])
    return out


def _retag(d):
    "Rewrite the manifest of `d` to match its files as they are now (damage that a manifest cannot catch)."
    extra = {k: v for k, v in json.loads((d / 'manifest.json').read_text()).items() if k != 'files'}
    (d / 'manifest.json').unlink(); IO.write_manifest(d, **extra)


def _edit_tensor(d, name_part, f):
    from safetensors.torch import load_file, save_file
    p = d / 'model.safetensors'; sd = load_file(p)
    k = next(k for k in sd if name_part in k); sd[k] = f(sd[k]); save_file(sd, p); _retag(d)


def _edit_json(p, f):
    j = json.loads(p.read_text()); f(j); p.write_text(json.dumps(j)); _retag(p.parent)


EXPORT_DAMAGE = {  # name: (kinds, damage, text the message must contain)
    'truncated weights': (('ternary', 'w4a16'), lambda d: _truncate(d / 'model.safetensors'), 'model.safetensors is'),
    'flipped byte': (('ternary', 'w4a16'), lambda d: _flip(d / 'model.safetensors'), 'does not match its SHA-256'),
    'missing manifest': (('ternary', 'w4a16'), lambda d: (d / 'manifest.json').unlink(), 'manifest.json is missing'),
    'config not JSON': (('ternary', 'w4a16'), lambda d: (d / 'config.json').write_text('{"vocab'), 'config.json'),
    'quant_config not JSON': (('w4a16',), lambda d: (d / 'quant_config.json').write_text('{'), 'quant_config.json'),
    'quant_config without bits': (('w4a16',), lambda d: _edit_json(d / 'quant_config.json', lambda j: j.pop('bits')),
                                  "quant_config.json: missing or mistyped ['bits']"),
    'quant_config unknown module': (('w4a16',), lambda d: _edit_json(d / 'quant_config.json', lambda j: j['modules'].append(
        'model.layers.7.mlp.up_proj')), "lists 'model.layers.7.mlp.up_proj'"),
    'tensor of another dtype': (('w4a16',), lambda d: _edit_tensor(d, 'scales', lambda t: t.float()),
                                'dtype torch.float32, the model expects torch.float16'),
    'packed tensor of another shape': (('ternary',), lambda d: _edit_tensor(d, 'q_proj.qweight', lambda t: t[:, :-1].contiguous()),
                                       'q_proj in'),
    'not ours': (('ternary',), lambda d: _edit_json(d / 'config.json', lambda j: j.pop('quantization_config')),
                 'not a BitCPM ternary export'),
}


@pytest.mark.parametrize("kind, damage", [(k, d) for d, (ks, _, _) in EXPORT_DAMAGE.items() for k in ks])
def test_damaged_export_is_refused_naming_the_file(kind, damage, exports, tmp_path):
    src, _ = exports[kind]
    d = tmp_path / kind; shutil.copytree(src, d)
    EXPORT_DAMAGE[damage][1](d)
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=re.escape(EXPORT_DAMAGE[damage][2])) as e:
        EXPORTS[kind][2](d)
    assert str(d) in str(e.value), str(e.value)


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_export_round_trip_and_bad_targets(kind, exports, tmp_path):
    make, save, load = EXPORTS[kind]
    src, files = exports[kind]
    m = load(src)
    ids = torch.randint(0, QV, (2, 7))
    ref = make()
    with torch.no_grad(): a, b = ref(ids), m(ids)
    assert ((a - b).norm() / a.norm()) < 2e-3
    with pytest.raises(FileNotFoundError, match='is not a folder'): load(tmp_path / 'nothing')
    if kind == 'ternary':
        with pytest.raises(ValueError, match='dtype=torch.int8'): load(src, dtype=torch.int8)
    (tmp_path / 'file').write_text('x')
    with pytest.raises(NotADirectoryError, match='is not a folder'): save(ref, tmp_path / 'file')
    assert (tmp_path / 'file').read_text() == 'x'


def test_export_argument_errors_write_nothing(tmp_path):
    m = ternary_model()
    with pytest.raises(ValueError, match='scale_dtype'): B.export_ternary(m, tmp_path / 'a', scale_dtype=torch.int8)
    with pytest.raises(ValueError, match='dtype=torch.int32'): B.export_ternary(m, tmp_path / 'a', dtype=torch.int32)
    with pytest.raises(ValueError, match='no BitLinear'): B.export_ternary(tiny(), tmp_path / 'a')
    with pytest.raises(ValueError, match=r'quantize_model\(\.\.\., pack=True\)'): PQ.save_quantized(tiny(), tmp_path / 'a')
    assert not (tmp_path / 'a').exists()


EXPORT_CHILD = r"""
import json, os, resource, signal, sys, traceback
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from test_faults import EXPORTS
import safetensors.torch as ST
base = Path(sys.argv[1])
models = {k: make(seed=1) for k, (make, _, _) in EXPORTS.items()}   # the new versions, all different from the old

def probe(kind, how):
    make, save, _ = EXPORTS[kind]
    target = base / kind
    if how == 'full_disk':
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))       # every export is > 40 kB
    elif how == 'read_only':
        os.chmod(base, 0o555)
        if os.geteuid() == 0: os.setgid(65534); os.setuid(65534)     # root ignores permissions: become nobody
    elif how == 'kill':                                               # SIGKILL after half of the weights are written
        orig = ST.save_file
        def half(sd, path, *a, **k):
            orig(sd, path, *a, **k)
            p = Path(path); p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        ST.save_file = half
    try: save(models[kind], target); return 'no error'
    except OSError as e: return f'{type(e).__name__}: {e}'

out, pids = {}, {}
for kind in EXPORTS:
    for how in ('full_disk', 'read_only', 'kill'):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try: msg = probe(kind, how)
            except BaseException: msg = 'other: ' + traceback.format_exc()[-800:]
            os.write(w, msg.encode()); os._exit(0)
        os.close(w)
        msg = os.read(r, 100_000).decode(); os.close(r)
        _, st = os.waitpid(pid, 0)
        out[f'{kind}/{how}'] = dict(msg=msg, status=os.waitstatus_to_exitcode(st))
        os.chmod(base, 0o755)
print('EXPORTS ' + json.dumps(out), flush=True)
"""


def test_exports_survive_full_disk_read_only_target_and_kill(exports, tmp_path):
    base = next(iter(exports.values()))[0].parent
    (tmp_path / 'child.py').write_text(EXPORT_CHILD)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(HERE.parent))
    p = subprocess.run([sys.executable, str(tmp_path / 'child.py'), str(base), str(HERE)], env=env, text=True,
                       capture_output=True, timeout=300)
    line = next((l for l in p.stdout.splitlines() if l.startswith('EXPORTS ')), None)
    assert p.returncode == 0 and line, p.stderr[-3000:]
    res = json.loads(line[8:])
    for kind, (_, save, load) in EXPORTS.items():
        target, files = exports[kind]
        fd, ro, kill = res[f'{kind}/full_disk'], res[f'{kind}/read_only'], res[f'{kind}/kill']
        assert 'File too large' in fd['msg'] and str(target) in fd['msg'] and 'unchanged' in fd['msg'], fd
        assert 'Permission denied' in ro['msg'] and str(target) in ro['msg'], ro
        assert kill['status'] == -signal.SIGKILL, kill
        # after all three the old export is there, bit for bit, and loads
        assert IO.verify_manifest(target)['files'] == files
        load(target)
        # the next save cleans the dead writer's temporary sibling and replaces the folder whole
        assert any('.tmp-' in s for s in siblings(target)), siblings(target)   # left by the killed writer
        save(EXPORTS[kind][0](seed=1), target)
        assert siblings(target) == [] and IO.verify_manifest(target)['files'] != files


# ---------------------------------------------------------------------------------------------- data readers
def _rand_texts(n, seed):
    rng = __import__('random').Random(seed)
    return [' '.join(''.join(rng.choice('abcdefgh') for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 8)))
            for _ in range(n)]


def test_read_texts_reads_every_format_like_the_reference(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    texts = _rand_texts(20, 1) + ['', 'é ü 日本']
    (tmp_path / 'a.txt').write_text('\n'.join(texts) + '\n', encoding='utf-8')
    (tmp_path / 'a.jsonl').write_text('\n'.join(json.dumps({'text': t, 'n': i}) for i, t in enumerate(texts)) + '\n\n')
    (tmp_path / 'a.json').write_text(json.dumps([{'text': t} for t in texts]))
    pq.write_table(pa.table({'text': texts, 'x': list(range(len(texts)))}), tmp_path / 'a.parquet', row_group_size=5)
    for ext in ('txt', 'jsonl', 'json', 'parquet'):
        assert list(D.read_texts(tmp_path / f'a.{ext}')) == texts, ext
    assert list(D.read_texts([tmp_path / 'a.txt', tmp_path / 'a.txt'])) == texts * 2


def _jsonl_bad_line(d):
    lines = [json.dumps({'text': t}) for t in _rand_texts(6, 2)]
    lines[3] = lines[3][:-4]
    (d / 'x.jsonl').write_text('\n'.join(lines)); return d / 'x.jsonl'


def _non_utf8(d, ext='txt'):
    "Six good lines, then one with a Latin-1 byte: returns the path and that byte's offset."
    lines = [t if ext == 'txt' else json.dumps({'text': t}) for t in _rand_texts(6, 3)]
    good = ('\n'.join(lines) + '\n').encode()
    bad = b'caf\xe9' if ext == 'txt' else b'{"text": "caf\xe9"}'
    (d / f'x.{ext}').write_bytes(good + bad + b'\n')
    return d / f'x.{ext}', len(good) + bad.index(b'\xe9')


def _parquet(d, cols):
    import pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.table(cols), d / 'x.parquet'); return d / 'x.parquet'


READ_DAMAGE = {  # name: (make the file -> (path, text the message must contain), exception)
    'JSONL bad line': (lambda d: (_jsonl_bad_line(d), 'x.jsonl, line 4: not valid JSON'), ValueError),
    'JSONL line not an object': (lambda d: ((d / 'x.jsonl').write_text('{"text": "a"}\n[1, 2]\n') and d / 'x.jsonl',
                                            'x.jsonl, line 2: expected a JSON object'), ValueError),
    'JSONL missing field': (lambda d: ((d / 'x.jsonl').write_text('{"text": "a"}\n{"body": "b"}\n') and d / 'x.jsonl',
                                       "x.jsonl, line 2: records have no field 'text'; fields: ['body']"), KeyError),
    'JSONL null text': (lambda d: ((d / 'x.jsonl').write_text('{"text": null}\n') and d / 'x.jsonl',
                                   "x.jsonl, line 1: field 'text' is NoneType"), TypeError),
    'txt not UTF-8': (lambda d: (lambda p, o: (p, f'x.txt: not UTF-8 at byte offset {o} (line 7)'))(*_non_utf8(d)),
                      UnicodeError),
    'JSONL not UTF-8': (lambda d: (lambda p, o: (p, f'x.jsonl: not UTF-8 at byte offset {o} (line 7)'))(*_non_utf8(d, 'jsonl')),
                        UnicodeError),
    'empty file': (lambda d: ((d / 'x.txt').write_bytes(b'') or d / 'x.txt', 'x.txt is empty (0 bytes)'), ValueError),
    'JSON array bad': (lambda d: ((d / 'x.json').write_text('[{"text": "a"}, {"te') and d / 'x.json',
                                  'x.json: not valid JSON'), ValueError),
    'parquet missing column': (lambda d: (_parquet(d, {'body': ['a', 'b']}), "x.parquet: no column 'text'; columns: ['body']"),
                               KeyError),
    'parquet null text': (lambda d: (_parquet(d, {'text': ['a', None]}), "x.parquet, row 1: column 'text' holds None"),
                          TypeError),
    'parquet random bytes': (lambda d: ((d / 'x.parquet').write_bytes(os.urandom(300)) and d / 'x.parquet',
                                        'x.parquet is not a readable parquet file'), ValueError),
    'parquet truncated': (lambda d: (lambda p: (_truncate(p), p)[1])(_parquet(d, {'text': _rand_texts(50, 4)})) and
                          (d / 'x.parquet', 'x.parquet is not a readable parquet file'), ValueError),
    'a folder': (lambda d: ((d / 'x.txt').mkdir() or d / 'x.txt', 'x.txt is a folder'), IsADirectoryError),
}


@pytest.mark.parametrize("kind", list(READ_DAMAGE))
def test_read_texts_damage_names_the_file_and_place(kind, tmp_path):
    make, exc = READ_DAMAGE[kind]
    p, text = make(tmp_path)
    with pytest.raises(exc) as e: list(D.read_texts(p))
    assert text in str(e.value) and str(tmp_path) in str(e.value), str(e.value)


def test_tokenizer_file_faults(tmp_path):
    tok = D.train_tokenizer(_rand_texts(200, 5), 300)
    p = tok.save(tmp_path)
    assert sorted(x.name for x in tmp_path.iterdir()) == ['tokenizer.json']      # no temporary file left
    ids = tok.encode('abc defg')
    assert D.load_tokenizer(tmp_path).encode('abc defg') == ids
    for damage in (_truncate, lambda q: q.write_text('{"version": "1.0", "model": 3}'), lambda q: q.write_bytes(b'\xff\xfe')):
        q = tmp_path / 'd' / 'tokenizer.json'; q.parent.mkdir(exist_ok=True); shutil.copy(p, q); damage(q)
        with pytest.raises(IO.IntegrityError, match=re.escape(str(q)) + ' is not a readable tokenizer.json'):
            D.load_tokenizer(q.parent)


def test_built_corpus_faults(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    texts = _rand_texts(40, 6)
    f = tmp_path / 'brown'; f.mkdir()
    for s in ('train', 'heldout'):
        pq.write_table(pa.table({'text': texts, 'doc_id': [f'brown/{s}{i}' for i in range(40)]}), f / f'{s}.parquet')
    with pytest.raises(FileNotFoundError, match=r"brown.*incomplete \(no manifest.json\)"): D.load_corpus('brown', root=tmp_path)
    (f / 'manifest.json').write_text('{"name": "brown", ')
    with pytest.raises(IO.IntegrityError, match=re.escape(str(f / 'manifest.json')) + ' is corrupt'): D.built_corpora(tmp_path)
    (f / 'manifest.json').write_text('{"name": "brown"}')
    assert len(D.load_corpus('brown', 'all', root=tmp_path)) == 80
    pq.write_table(pa.table({'text': texts}), f / 'heldout.parquet')
    with pytest.raises(KeyError, match=re.escape(str(f / 'heldout.parquet')) + r".*no column\(s\) \['doc_id'\]"):
        D.load_corpus('brown', 'heldout', root=tmp_path)
    _truncate(f / 'train.parquet')
    with pytest.raises(IO.IntegrityError, match=re.escape(str(f / 'train.parquet'))): D.load_corpus('brown', root=tmp_path)


def test_batches_and_entropy_refuse_bad_input():
    with pytest.raises(ValueError, match=r'rows must be a non-empty \(n, seq_len \+ 1\) tensor, got \(0, 5\)'):
        next(D.batches(torch.zeros(0, 5, dtype=torch.long), 2))
    with pytest.raises(ValueError, match='min -3'): D.unigram_entropy(torch.tensor([1, -3, 2]))
    with pytest.raises(ValueError, match='0 values'): D.unigram_entropy([])
    with pytest.raises(ValueError, match='float32'): D.unigram_entropy(torch.rand(5))


# ---------------------------------------------------------------------------------------------- llama / hf readers
from minicpm4_core import llama as LL  # noqa: E402


def _llama_folder(d):
    "A Hugging Face Llama folder (config.json + model.safetensors) holding the tiny model's tensors."
    from safetensors.torch import save_file
    m = tiny()
    d.mkdir()
    (d / 'config.json').write_text(json.dumps(dict(
        model_type='llama', vocab_size=QV, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0)))
    save_file({k: v for k, v in m.state_dict().items() if k != 'lm_head.weight'}, d / 'model.safetensors')
    return d


def _cfg_edit(f):
    def damage(d):
        p = d / 'config.json'; j = json.loads(p.read_text()); f(j); p.write_text(json.dumps(j))
    return damage


LLAMA_DAMAGE = {  # name: (damage, exception, text the message must contain)
    'config not JSON': (lambda d: (d / 'config.json').write_text('{"vocab_size": 1'), IO.IntegrityError, 'config.json is corrupt'),
    'config a list': (lambda d: (d / 'config.json').write_text('[]'), IO.IntegrityError, 'config.json is not a JSON object'),
    'config without heads': (_cfg_edit(lambda j: j.pop('num_attention_heads')), KeyError, "missing ['num_attention_heads']"),
    'config with yarn': (_cfg_edit(lambda j: j.update(rope_scaling={'rope_type': 'yarn'})), ValueError, "rope type 'yarn'"),
    'truncated weights': (lambda d: _truncate(d / 'model.safetensors'), IO.IntegrityError, 'model.safetensors is not a readable'),
    'weights missing': (lambda d: (d / 'model.safetensors').unlink(), FileNotFoundError, 'no model.safetensors'),
}


@pytest.mark.parametrize("kind", list(LLAMA_DAMAGE))
def test_llama_folder_damage_names_the_file(kind, tmp_path):
    d = _llama_folder(tmp_path / 'llama')
    damage, exc, text = LLAMA_DAMAGE[kind]
    damage(d)
    with pytest.raises(exc) as e: LL.from_llama(d, tokenizer=False, progress=False)
    assert text in str(e.value) and str(d) in str(e.value), str(e.value)


def test_gguf_damage_names_the_file(tmp_path):
    pytest.importorskip('gguf')
    from test_llama import _write_gguf
    good = tmp_path / 'tiny.gguf'
    _write_gguf(good, tiny(), quantize=False)
    m, _ = LL.from_llama(good, tokenizer=False, progress=False)
    ids = torch.randint(0, QV, (1, 9))
    assert torch.isfinite(m(ids)).all()
    raw = good.read_bytes()
    for name, data in (('random', os.urandom(4096)), ('header only', raw[:200]), ('half', raw[: len(raw) // 2]),
                       ('tensor data cut', raw[:-100])):
        p = tmp_path / f'{name}.gguf'; p.write_bytes(data)
        with pytest.raises(IO.IntegrityError, match=re.escape(str(p))): LL.read_gguf(p, progress=False)


def test_perplexity_refuses_float_and_out_of_vocabulary_ids():
    m = tiny().eval()
    ids = torch.randint(0, QV, (40,))
    assert LL.perplexity(m, ids, window=16, progress=False) > 1
    with pytest.raises(TypeError, match='ids: token ids must be integers'): LL.perplexity(m, ids.float() + 0.5, progress=False)
    with pytest.raises(IndexError, match=rf'ids: token ids must lie in \[0, vocab_size={QV}\)'):
        LL.perplexity(m, torch.cat([ids, torch.tensor([QV])]), progress=False)


def test_hf_remote_code_reading_names_the_file(tmp_path):
    transformers = pytest.importorskip('transformers')
    from minicpm4_core.model import save_pretrained
    good = tmp_path / 'm'; save_pretrained(tiny(), good)
    bad_cfg = tmp_path / 'cfg'; shutil.copytree(good, bad_cfg)
    _cfg_edit(lambda j: j.update(hidden_size='64'))(bad_cfg)
    with pytest.raises(TypeError, match=re.escape(str(bad_cfg / 'config.json')) + '.*hidden_size must be an int'):
        transformers.AutoConfig.from_pretrained(str(bad_cfg), trust_remote_code=True)
    cut = tmp_path / 'cut'; shutil.copytree(good, cut); _truncate(cut / 'model.safetensors')
    with pytest.raises(IO.IntegrityError, match=re.escape(str(cut / 'model.safetensors')) + ' is not a readable'):
        transformers.AutoModelForCausalLM.from_pretrained(str(cut), trust_remote_code=True)


SAVE_SCRIPT = r'''
import resource, signal, sys, torch
from pathlib import Path
from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.model import MiniCPM4ForCausalLM, save_pretrained
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # a full disk answers EFBIG instead of killing us
out = Path(sys.argv[1])
torch.manual_seed(1)
b = MiniCPM4ForCausalLM(MiniCPM4Config.from_preset('tiny', vocab_size=300))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))   # the weights (~0.5 MB) cannot be written
try: save_pretrained(b, out); print('NO ERROR')
except OSError as e: print('OSError', e)
'''


def test_save_pretrained_is_atomic_and_keeps_other_files(tmp_path):
    "A full disk during save_pretrained leaves the previous model loadable; files that are not the model's stay."
    import subprocess
    from minicpm4_core.model import load_pretrained, save_pretrained
    torch.manual_seed(0)
    a = MiniCPM4ForCausalLM(MiniCPM4Config.from_preset('tiny', vocab_size=300))
    save_pretrained(a, tmp_path / 'm')
    (tmp_path / 'm' / 'tokenizer.json').write_text('{"keep": true}')
    r = subprocess.run([sys.executable, '-c', SAVE_SCRIPT, str(tmp_path / 'm')], capture_output=True, text=True,
                       timeout=300)
    assert 'OSError' in r.stdout, r.stdout + r.stderr[-2000:]
    back = load_pretrained(tmp_path / 'm')
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), back.state_dict().values()))
    assert (tmp_path / 'm' / 'tokenizer.json').read_text() == '{"keep": true}'
    torch.manual_seed(2)
    c = MiniCPM4ForCausalLM(MiniCPM4Config.from_preset('tiny', vocab_size=300))
    save_pretrained(c, tmp_path / 'm')                    # a successful save replaces the model, keeps the tokenizer
    back = load_pretrained(tmp_path / 'm')
    assert all(torch.equal(x, y) for x, y in zip(c.state_dict().values(), back.state_dict().values()))
    assert (tmp_path / 'm' / 'tokenizer.json').exists()
