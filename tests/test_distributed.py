"""FSDP2 training on CPU (gloo): 1 process == `train.train`, 2 processes == 1 process, kill + resume bit-identical,
a 2-rank checkpoint resumes on 1 rank and consolidates into a save_pretrained folder; bad checkpoints refused."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minicpm4_core import distributed as DD
from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.io import IntegrityError
from minicpm4_core.model import MiniCPM4ForCausalLM, load_pretrained
from minicpm4_core.train import TrainConfig, train

ARGS = ['--steps', '6', '--batch-size', '8', '--seq-len', '32', '--vocab-size', '300', '--lr', '1e-2',
        '--ckpt-every', '2']


def _launch(n, tmp, *extra, env_extra=None, check=True):
    cmd = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(n)] if n > 1 else
           [sys.executable]) + ['-m', 'minicpm4_core.distributed', *ARGS, *extra]
    env = dict(os.environ, OMP_NUM_THREADS='1', **(env_extra or {}))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp, timeout=600)
    if check: assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('fsdp')
    _launch(2, tmp, '--ckpt-dir', 'ckA', '--out', 'outA', '--history', 'hA.json')            # uninterrupted, 2 ranks
    r = _launch(2, tmp, '--ckpt-dir', 'ckK', env_extra=dict(MINICPM4_KILL_AFTER_STEP='4'), check=False)
    assert r.returncode != 0                                                                  # SIGKILLed after step 4
    shutil.copytree(tmp / 'ckK', tmp / 'ck_step2')
    (tmp / 'killed_at.json').write_text((tmp / 'ckK' / 'trainer_state.json').read_text())
    _launch(2, tmp, '--ckpt-dir', 'ckK', '--resume', '--out', 'outK', '--history', 'hK.json')  # resumed, 2 ranks
    _launch(1, tmp, '--ckpt-dir', 'ck_step2', '--resume', '--out', 'out1r')                  # 2-rank ckpt on 1 rank
    return tmp


def test_two_processes_equal_one(runs):
    "The 2-rank run's loss curve == the plain single-process `train` on the same rows, init and config."
    a = json.loads((runs / 'hA.json').read_text())
    rows, valid, tok = DD.embedded_rows('small', 300, 32, 0)
    torch.manual_seed(0)
    m = MiniCPM4ForCausalLM(MiniCPM4Config.from_preset('tiny', vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                                       eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
    b = train(m, rows, TrainConfig(steps=6, batch_size=8, lr=1e-2, seed=0, progress=False, eval_every=1), valid).history
    assert a['world'] == 2 and len(a['loss']) == 6
    assert max(abs(x - y) for x, y in zip(a['loss'], b['loss'])) < 1e-4
    assert max(abs(x - y) for x, y in zip(a['eval_loss'], b['eval_loss'])) < 1e-4
    assert a['loss'][-1] < a['loss'][0] - 0.3   # it trains


def test_kill_and_resume_is_bit_identical(runs):
    assert json.loads((runs / 'killed_at.json').read_text())['step'] == 2   # killed after step 4, before its save
    A, K = load_file(runs / 'outA' / 'model.safetensors'), load_file(runs / 'outK' / 'model.safetensors')
    assert A.keys() == K.keys() and all(torch.equal(A[k], K[k]) for k in A)
    assert json.loads((runs / 'hA.json').read_text())['loss'] == json.loads((runs / 'hK.json').read_text())['loss']


def test_two_rank_checkpoint_resumes_on_one(runs):
    A, R = load_file(runs / 'outA' / 'model.safetensors'), load_file(runs / 'out1r' / 'model.safetensors')
    for k in A:
        assert float((A[k] - R[k]).abs().max()) <= 1e-3 * float(A[k].abs().max()) + 1e-6, k
    m = load_pretrained(runs / 'outA')            # the consolidated folder is a normal model folder
    ids = torch.randint(0, m.config.vocab_size, (2, 16))
    assert torch.isfinite(m(ids)).all()


def test_one_process_fsdp_equals_train(tmp_path):
    torch.set_num_threads(1)
    rows, valid, tok = DD.embedded_rows('small', 300, 32, 0)

    def fresh():
        torch.manual_seed(0)
        return MiniCPM4ForCausalLM(MiniCPM4Config.from_preset('tiny', vocab_size=tok.vocab_size))
    tc = TrainConfig(steps=4, batch_size=8, lr=1e-2, seed=0, progress=False, eval_every=2)
    ref = train(fresh(), rows, tc, valid)
    ctx = DD.init_distributed()
    try:
        got = DD.train_fsdp(fresh(), rows, TrainConfig(**{**tc.__dict__, 'ckpt_dir': str(tmp_path / 'ck')}), valid,
                            ctx=ctx)
        assert max(abs(a - b) for a, b in zip(ref.history['loss'], got.history['loss'])) < 1e-5
        assert got.history['eval_step'] == ref.history['eval_step']
        # the checkpoint is refused when the run differs or a shard is corrupt
        with pytest.raises(ValueError, match='lr'):
            DD.check_sharded_resume(tmp_path / 'ck', fresh(), TrainConfig(**{**tc.__dict__, 'lr': 2e-2}))
        shard = next((tmp_path / 'ck' / 'dcp').glob('*.distcp'))
        data = bytearray(shard.read_bytes()); data[len(data) // 2] ^= 0xFF; shard.write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match='distcp'):
            DD.check_sharded_resume(tmp_path / 'ck', fresh(), tc)
    finally:
        ctx.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match='backend'):
        DD.init_distributed('mpi')
    with pytest.raises(ValueError, match='divisible'):
        next(DD.rank_batches(torch.zeros(10, 5, dtype=torch.long), 7, 0, 0, 2))
    with pytest.raises(TypeError, match='MiniCPM4ForCausalLM'):
        DD.shard_model(torch.nn.Linear(2, 2), None)


def test_rank_slices_make_the_global_batch():
    rows = torch.randint(0, 50, (30, 9), generator=torch.Generator().manual_seed(1))
    single, split = DD.D.batches(rows, 6, 3), [DD.rank_batches(rows, 6, 3, r, 3) for r in range(3)]
    for _ in range(12):   # crosses epoch reshuffles
        assert torch.equal(next(single), torch.cat([next(s) for s in split]))


def test_activation_fit_is_exact_on_our_layer():
    base = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    shapes = [base, dict(base, hidden_size=64), dict(base, intermediate_size=96), dict(base, num_attention_heads=4),
              dict(base, num_key_value_heads=2), dict(base, hidden_size=96, num_attention_heads=6,
                                                      num_key_value_heads=3, intermediate_size=160)]
    fit = DD.layer_activation_fit(shapes, seq_len=16)
    assert fit['max_rel_error'] < 1e-6
    shape = dict(base, hidden_size=48, num_attention_heads=3, num_key_value_heads=1, intermediate_size=80, mtp=False)
    c, two = MiniCPM4Config(**shape, num_hidden_layers=1), MiniCPM4Config(**shape, num_hidden_layers=2)
    torch.manual_seed(0)
    measured = (DD.saved_bytes(MiniCPM4ForCausalLM(two), 24) - DD.saved_bytes(MiniCPM4ForCausalLM(c), 24)) / 24
    predicted = sum(k * f for k, f in zip(fit['coef'].values(), DD._act_features(c)))
    assert abs(measured - predicted) <= 1e-6 * measured
