"""Chunk-wise rollout GRPO (minicpm4_core.rl): task, rollouts, the §6 loss (by hand and against TRL), the buffer."""
import math
import random
from types import SimpleNamespace

import pytest
import torch

from minicpm4_core import rl

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def task():
    return rl.AdditionTask(max_digits=4)


@pytest.fixture(scope='module')
def model(task):
    # a random tiny policy; a large init spread so that greedy rollouts vary from token to token (the default
    # init gives near-uniform logits and one repeated token, which would make the continuation checks weak)
    return rl.task_model(task, 'tiny', seed=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, initializer_range=1.0).eval()


# ---------------------------------------------------------------- task
def test_worked_solution_reward(task):
    rng = random.Random(0)
    for _ in range(50):
        a, b = task.sample(rng)
        sol = rl.worked_solution(a, b)
        steps, ans = sol.split('>')
        # independent reading of the steps: digits x, y, carry, 2-digit sum; the sums' last digits spell a + b
        digits, carry = [], 0
        for st in steps.strip(',').split(','):
            x, y, c, s = int(st[0]), int(st[1]), int(st[2]), int(st[3:])
            assert c == carry and s == x + y + c
            digits.append(s % 10); carry = s // 10
        assert int(ans) == a + b == int((str(carry) if carry else '') + ''.join(map(str, digits[::-1])))
        tgt = task.target((a, b))
        assert len(tgt) <= task.max_new_tokens
        assert task.reward((a, b), tgt) == 1.0
        assert task.reward((a, b), tgt[:-1]) == 0.0                       # no stop token: truncated
        wrong = task.tok.encode(steps + '>' + str(a + b + 1)) + [task.tok.eos_id]
        assert task.reward((a, b), wrong) == 0.0


def test_splits_disjoint_and_long_tail(task):
    train, held = task.splits(2000, 40, seed=3)
    assert not (set(held) & {it for it in train if it[0] >= 10})
    lens = sorted(len(task.target(it)) for it in train)
    assert lens[-1] >= 3 * lens[len(lens) // 2]                          # a long tail of solution lengths


# ---------------------------------------------------------------- loss
def _hand_loss(lp, old, ref, adv, mask, eps_low, eps_high, c, beta):
    "Loss and d loss / d lp by plain Python floats, regime by regime."
    n = sum(map(sum, mask))
    tot, grad = 0.0, [[0.0] * len(lp[0]) for _ in lp]
    for i in range(len(lp)):
        A = adv[i]
        for t in range(len(lp[0])):
            if not mask[i][t]: continue
            r = math.exp(lp[i][t] - old[i][t])
            rc = min(max(r, 1 - eps_low), 1 + eps_high)
            o = min(r * A, rc * A)
            active = (A > 0 and r <= 1 + eps_high) or (A < 0 and r >= 1 - eps_low)
            if c is not None and A < 0 and o < c * A: o, active = c * A, False
            d = ref[i][t] - lp[i][t]
            tot += -o + beta * (math.exp(d) - d - 1)
            grad[i][t] = ((-r * A) if active else 0.0) + beta * (1 - math.exp(d))
    return tot / n, [[g / n for g in row] for row in grad]


@pytest.mark.parametrize('dual_clip,beta', [(3.0, 0.05), (None, 0.0), (2.0, 0.001)])
def test_grpo_loss_matches_hand(dual_clip, beta):
    g = torch.Generator().manual_seed(7)
    N, L = 6, 9
    lp = -torch.rand(N, L, generator=g, dtype=torch.float64) * 3
    old = lp + torch.randn(N, L, generator=g, dtype=torch.float64) * 1.2   # ratios from ~0.05 to ~20: every regime
    ref = lp + torch.randn(N, L, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    lens = torch.randint(1, L + 1, (N,), generator=g)
    mask = torch.arange(L)[None] < lens[:, None]
    x = lp.clone().requires_grad_(True)
    loss, st = rl.grpo_loss(x, old, adv, mask, ref, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, beta=beta)
    loss.backward()
    want, want_grad = _hand_loss(lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                                 0.2, 0.28, dual_clip, beta)
    assert abs(loss.item() - want) < 1e-10
    assert torch.allclose(x.grad, torch.tensor(want_grad, dtype=torch.float64), atol=1e-12)
    assert 0 < st['clip_frac'] < 1


def test_ratio_one_gives_policy_gradient():
    # r = 1 everywhere (policy did not move): the clip is inactive and the gradient is -A / n per token
    lp = -torch.rand(3, 4, dtype=torch.float64)
    x = lp.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.bool); mask[1, 2:] = False
    loss, st = rl.grpo_loss(x, lp, adv, mask, beta=0.0)
    loss.backward()
    assert st['ratio_mean'] == pytest.approx(1.0) and st['clip_frac'] == 0.0
    assert torch.allclose(x.grad, -(adv[:, None] * mask) / mask.sum())


def test_advantages_and_dynamic_sampling():
    R = torch.tensor([[1., 0., 0., 1.], [1., 1., 1., 1.], [0., 0., 0., 0.], [0., 1., 0., 0.]])
    A = rl.group_advantages(R)
    for g in range(4):
        m = sum(R[g].tolist()) / 4
        sd = math.sqrt(sum((r - m) ** 2 for r in R[g].tolist()) / 3)
        assert torch.allclose(A[g], torch.tensor([(r - m) / (sd + 1e-4) for r in R[g].tolist()]), atol=1e-6)
    assert rl.keep_groups(R).tolist() == [True, False, False, True]


def test_train_batch_drops_uniform_groups_and_truncated(task):
    def S(g, reward, stopped): return rl.Sample(g, (1, 2), [1], tokens=[3, 2], logps=[-1., -1.], versions=[0, 0],
                                                done=True, stopped=stopped, reward=reward)
    groups = [[S(0, 1., True), S(0, 0., False), S(0, 0., True)],     # mixed; one truncated (reward 0)
              [S(1, 1., True), S(1, 1., True), S(1, 1., True)]]      # all right: no signal, dropped
    cfg = rl.RLConfig(group_size=3, rollout_batch=3)
    samples, adv, st = rl._train_batch(groups, cfg)
    assert st == dict(groups=2, kept_groups=1)
    assert samples == [groups[0][0], groups[0][2]]                   # truncated excluded from the loss...
    want = rl.group_advantages(torch.tensor([[1., 0., 0.]]))[0]      # ...but counted in its group's statistics
    assert torch.allclose(adv, want[[0, 2]])


def _trl_compute_loss():
    """TRL's own `GRPOTrainer._compute_loss`, compiled from the installed trl source without importing trl
    (importing it pulls in transformers' Trainer: ~30 s on 2 cores, and its optional `kernels` import clashes with
    this repository's `kernels/` folder). Skips when trl is not installed."""
    import ast
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec('trl')
    if spec is None or not spec.submodule_search_locations: pytest.skip('trl is not installed')
    src = (Path(list(spec.submodule_search_locations)[0]) / 'trainer' / 'grpo_trainer.py').read_text()
    cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == 'GRPOTrainer')
    fn = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == '_compute_loss'), None)
    if fn is None: pytest.skip('this trl version has no GRPOTrainer._compute_loss')
    ns = dict(torch=torch, nanmin=lambda x: x[~torch.isnan(x)].min(), nanmax=lambda x: x[~torch.isnan(x)].max())
    exec(compile(ast.Module([fn], []), 'trl/trainer/grpo_trainer.py', 'exec'), ns)
    return ns['_compute_loss']


def test_trl_loss_coincides():
    from collections import defaultdict
    compute_loss = _trl_compute_loss()
    g = torch.Generator().manual_seed(11)
    N, L, eps_low, eps_high, c, beta = 5, 7, 0.2, 0.28, 3.0, 0.04
    lp = -torch.rand(N, L, generator=g) * 3
    old = lp + torch.randn(N, L, generator=g) * 1.2
    ref = lp + torch.randn(N, L, generator=g) * 0.5
    adv = torch.randn(N, generator=g)
    mask = (torch.arange(L)[None] < torch.randint(1, L + 1, (N,), generator=g)[:, None])
    ours_x = lp.clone().requires_grad_(True)
    ours, _ = rl.grpo_loss(ours_x, old, adv, mask, ref, eps_low=eps_low, eps_high=eps_high, dual_clip=c, beta=beta)
    ours.backward()
    # a stub trainer whose model "returns" our log-probs; loss_type='bnpo' = token-level average, delta = c
    theirs_x = lp.clone().requires_grad_(True)
    acc = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction='sum': x,
                          num_processes=1, sync_gradients=True)
    t = SimpleNamespace(loss_type='bnpo', epsilon_low=eps_low, epsilon_high=eps_high, beta=beta,
                        importance_sampling_level='token', top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                        use_vllm=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
                        current_gradient_accumulation_steps=1, accelerator=acc,
                        _metrics=defaultdict(lambda: defaultdict(list)), model=SimpleNamespace(training=True),
                        args=SimpleNamespace(delta=c, use_bias_correction_kl=False),
                        _get_per_token_logps_and_entropies=lambda *a, **k: (theirs_x, torch.zeros_like(lp), None))
    inputs = dict(prompt_ids=torch.zeros(N, 1, dtype=torch.long), prompt_mask=torch.ones(N, 1, dtype=torch.long),
                  completion_ids=torch.zeros(N, L, dtype=torch.long), completion_mask=mask.long(),
                  advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref)
    theirs = compute_loss(t, None, inputs)
    theirs.backward()
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(ours_x.grad, theirs_x.grad, atol=1e-7)
    # without the dual clip (c = inf in ours, no delta in TRL) the two still agree; with it but without delta they
    # differ exactly on the negative-advantage tokens with r > c
    t.args.delta = None
    plain, _ = rl.grpo_loss(lp, old, adv, mask, ref, eps_low=eps_low, eps_high=eps_high, dual_clip=None, beta=beta)
    assert torch.allclose(plain, compute_loss(t, None, inputs).detach(), atol=1e-6)
    r = torch.exp(lp - old)
    assert bool(((adv[:, None] < 0) & (r > c) & mask).any()) and not torch.allclose(plain, ours.detach(), atol=1e-4)


# ---------------------------------------------------------------- rollouts
def _prompts(task, n, seed):
    rng = random.Random(seed)
    return [task.prompt(task.sample(rng)) for _ in range(n)]


def test_rollout_greedy_matches_generate(task, model):
    ps = _prompts(task, 5, 0)
    out = rl.rollout_chunk(model, ps, [12] * 5, temperature=0, stop_id=task.tok.eos_id)
    ref = model.generate(ps, 12, stop_ids=[task.tok.eos_id], pad_id=0)
    assert out.tokens == ref
    assert out.stopped == [bool(r) and r[-1] == task.tok.eos_id for r in ref]


def test_chunked_continuation_equals_uninterrupted(task, model):
    ps = _prompts(task, 4, 1)
    full = rl.rollout_chunk(model, ps, [14] * 4, temperature=0, stop_id=-1)    # never stops: 14 tokens each
    toks, lps = [[] for _ in ps], [[] for _ in ps]
    for _ in range(3):   # chunks of 5, 5, 4
        out = rl.rollout_chunk(model, [p + t for p, t in zip(ps, toks)], [min(5, 14 - len(t)) for t in toks],
                               temperature=0, stop_id=-1)
        for i in range(4): toks[i] += out.tokens[i]; lps[i] += out.logps[i]
    assert toks == full.tokens and len({t for row in toks for t in row}) > 3   # varied tokens, not one repeated
    assert torch.allclose(torch.tensor(lps), torch.tensor(full.logps), atol=1e-4)


def test_ratios_one_when_policy_unchanged(task, model):
    ps = _prompts(task, 6, 2)
    out = rl.rollout_chunk(model, ps, [10] * 6, temperature=1.0, stop_id=task.tok.eos_id,
                           generator=torch.Generator().manual_seed(0))
    lp, mask = rl.sequence_logprobs(model, ps, out.tokens)
    old = torch.zeros_like(lp)
    for i, l in enumerate(out.logps): old[i, :len(l)] = torch.tensor(l)
    assert mask.sum() == sum(map(len, out.tokens))
    assert torch.allclose(torch.exp(lp - old)[mask], torch.ones(int(mask.sum())), atol=1e-4)


def test_buffer_carries_unfinished_samples(task, model):
    cfg = rl.RLConfig(rollout_batch=8, group_size=4, max_new_tokens=11, chunk_len=4, max_span=3)
    train, _ = task.splits(50, 4, seed=0)
    buf = rl.RolloutBuffer(train, task, cfg.group_size, cfg.rollout_batch, seed=0)
    gen = torch.Generator().manual_seed(0)
    carried = 0
    for step in range(6):
        before = buf.unfinished()
        rl._rollout_step(model, buf, cfg, step, gen)
        active_ids = {id(s) for g in buf.groups.values() for s in g}
        carried += len(before)
        for s in before:   # every sample unfinished before the step took part in it (same object, continued)
            assert s.spans >= 2 and s.versions[-1] == step and id(s) in active_ids
        for g in buf.groups.values():
            for s in g:
                assert len(s.tokens) == len(s.logps) == len(s.versions) <= cfg.max_new_tokens   # no overshoot
                assert s.versions == sorted(s.versions) and s.spans <= cfg.max_span
                if s.spans == cfg.max_span: assert s.done           # the span cap finishes a sample
                if not s.done: assert len(s.tokens) == 4 * s.spans  # a chunk of exactly chunk_len
        for grp in buf.ready_groups():
            assert all(s.done for s in grp) and len(grp) == 4
            for s in grp: assert s.reward == task.reward(s.item, s.tokens)
    assert carried > 0


class _ParityTask(rl.AdditionTask):
    "The addition prompts with an arbitrary but non-degenerate reward, so a random policy gets a learning signal."
    def reward(self, item, response): return float(len(response) % 2 == 0)


def test_train_rl_runs_vanilla_and_chunked(model):
    import copy
    task = _ParityTask(max_digits=4)
    train, held = task.splits(60, 4, seed=0)
    for chunk in (None, 4):
        m = copy.deepcopy(model)
        cfg = rl.RLConfig(steps=3, rollout_batch=8, group_size=4, max_new_tokens=10, chunk_len=chunk,
                          max_span=2, lr=1e-3, eval_every=3, progress=False)
        h = rl.train_rl(m, task, train, cfg, eval_fn=lambda mm: rl.heldout_accuracy(mm, task, held))
        assert len(h['t_sample']) == 3 and h['eval_step'] == [0, 3] and len(h['eval_acc']) == 2
        assert max(h['lengths']) <= 10 and max(h['decode_steps']) <= 10
        if chunk is None:
            assert set(h['lag']) == {0} and h['unfinished_at_end'] == 0 and h['active'] == [8, 8, 8]
        else:
            assert max(h['decode_steps']) <= 6 and max(h['lag']) <= 1   # chunk 4, or the rest (6) at the span cap
        assert sum(h['trained']) > 0
        assert any(not torch.equal(p, q) for p, q in zip(m.parameters(), model.parameters()))


def test_bad_arguments(task, model):
    with pytest.raises(ValueError, match='group_size'): rl.RLConfig(group_size=1).validate()
    with pytest.raises(ValueError, match='chunk_len'): rl.RLConfig(chunk_len=0).validate()
    with pytest.raises(ValueError, match='rollout_batch'): rl.RLConfig(rollout_batch=2, group_size=4).validate()
    with pytest.raises(ValueError, match='dual_clip'): rl.RLConfig(dual_clip=0.5).validate()
    with pytest.raises(ValueError, match='temperature'): rl.RLConfig(temperature=0).validate()
    with pytest.raises(ValueError, match='budgets'): rl.rollout_chunk(model, [[1, 4]], [3, 3])
    with pytest.raises(ValueError, match='budgets'): rl.rollout_chunk(model, [[1, 4]], [0])
    with pytest.raises(ValueError, match='ref_logp'): rl.grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1),
                                                                   torch.ones(1, 2, dtype=torch.bool), beta=0.1)
    with pytest.raises(ValueError, match='shapes'): rl.grpo_loss(torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1),
                                                                 torch.ones(1, 2, dtype=torch.bool), beta=0.0)
    with pytest.raises(ValueError, match='not in the vocabulary'): task.tok.encode('12a')
    with pytest.raises(ValueError, match='equal length'): rl.worked_solution(12, 3)
    with pytest.raises(ValueError, match='G >= 2'): rl.group_advantages(torch.zeros(3))


# ---------------------------------------------------------------- session 3: intake, held-out split, experiment
def test_heldout_same_distribution(task):
    train, held = task.splits(3000, 3000, seed=5, heldout='same')
    multi = [it for it in held if it[0] >= 10]
    assert len(set(multi)) == len(multi) and not (set(multi) & set(train))   # >= 2 digits: unique and unseen
    # the digit shares of the held-out split follow the training distribution (within 4 binomial SEs)
    for d, w in enumerate(task.weights, 1):
        share = sum(len(str(a)) == d for a, _ in held) / len(held)
        assert abs(share - w) < 4 * math.sqrt(w * (1 - w) / len(held)), (d, share, w)
    with pytest.raises(ValueError, match="heldout must be"): task.splits(10, 10, heldout='hard')


def test_fixed_intake_per_step(task, model):
    # prompts_per_step: exactly that many new groups each step while the cap allows, on top of the carried samples
    cfg = rl.RLConfig(rollout_batch=40, group_size=4, prompts_per_step=2, max_new_tokens=11, chunk_len=3, max_span=4)
    cfg.validate()
    train, _ = task.splits(50, 4, seed=0)
    buf = rl.RolloutBuffer(train, task, cfg.group_size, cfg.rollout_batch, seed=0)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        carried = len(buf.unfinished())
        info = rl._rollout_step(model, buf, cfg, step, gen)
        assert info['active'] == carried + 8 and buf.next_group == 2 * (step + 1)
        buf.ready_groups()
    assert carried > 0
    with pytest.raises(ValueError, match='prompts_per_step'):
        rl.RLConfig(rollout_batch=8, group_size=4, prompts_per_step=3).validate()


def test_check_every_same_tokens(task, model):
    ps = _prompts(task, 6, 4)
    a = rl.rollout_chunk(model, ps, [3, 9, 12, 5, 12, 7], temperature=0, stop_id=task.tok.eos_id, check_every=1)
    b = rl.rollout_chunk(model, ps, [3, 9, 12, 5, 12, 7], temperature=0, stop_id=task.tok.eos_id, check_every=5)
    assert a.tokens == b.tokens and a.stopped == b.stopped and a.logps == b.logps
    with pytest.raises(ValueError, match='check_every'): rl.rollout_chunk(model, ps, [3] * 6, check_every=0)


def test_sft_stop_fn(task):
    m = rl.task_model(task, 'tiny', seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    train, _ = task.splits(100, 4, seed=0)
    asked = []
    losses = rl.sft(m, task, train, 20, batch_size=4, seed=0, progress=False, check_every=3,
                    stop_fn=lambda mm, step: asked.append(step) or step >= 6)
    assert asked == [3, 6] and len(losses) == 6 and m.training
    with pytest.raises(ValueError, match='check_every'): rl.sft(m, task, train, 2, check_every=0, progress=False)


def test_experiment_config():
    xp = rl.RLExperiment.from_params(dict(profile='x', device='cpu', seed=3, rl_steps=5, rl_chunks=[4], other=1))
    assert (xp.steps, xp.chunks, xp.seed) == (5, [4], 3)
    with pytest.raises(ValueError, match='unknown RLExperiment fields'): rl.RLExperiment.from_params(dict(rl_bogus=1))
    with pytest.raises(ValueError, match='chunks'): rl.RLExperiment(chunks=[0]).validate()
    with pytest.raises(ValueError, match='group'): rl.RLExperiment(group=1).validate()
    with pytest.raises(ValueError, match='sft_target'): rl.RLExperiment(sft_target=1.5).validate()
    gpu = rl.RLExperiment.for_profile('gpu', steps=2)
    assert gpu.device == 'cuda' and gpu.steps == 2 and gpu.profile == 'gpu'
    with pytest.raises(ValueError, match='unknown RLExperiment fields'): rl.RLExperiment.for_profile('ci', nope=1)


def test_summarise_by_hand():
    h = lambda ts, tl, tu, acc, fin, lag: dict(t_sample=ts, t_logprob=tl, t_update=tu, new_tokens=[10, 10], finished=fin,
                                               trained=fin, active=[4, 4], decode_steps=[8, 4], lag=lag, reward=[1.0, float('nan')],
                                               eval_acc=[0.5, acc])
    S = rl.summarise({'vanilla': h([2.0, 2.0], [0.5, 0.5], [0.5, 0.5], 0.6, [4, 4], [0, 0]),
                      'chunk 4': h([1.0, 0.6], [0.2, 0.2], [0.3, 0.1], 0.55, [2, 4], [0, 1, 2])}, sft_acc=0.5, n_eval=100)
    assert S['chunk 4']['sample_speedup'] == pytest.approx(2.0 / 0.8) and S['chunk 4']['step_speedup'] == pytest.approx(3.0 / 1.2)
    assert S['vanilla']['gain_points'] == pytest.approx(10.0) and S['chunk 4']['vs_vanilla_points'] == pytest.approx(-5.0)
    assert S['chunk 4']['mean_lag'] == pytest.approx(1.0) and S['vanilla']['mean_reward'] == 1.0
    assert S['vanilla']['se_points'] == pytest.approx(100 * math.sqrt(0.24 / 100))


def test_main_tiny_override(tmp_path, capsys):
    import json
    rc = rl.main(['--profile', 'ci', '--out', str(tmp_path), '--no-progress', '--set', 'device=cpu', 'max_digits=3',
                  "model={'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 1}", 'sft_steps=6',
                  'sft_check_every=3', 'sft_target=0.9', 'steps=2', 'prompts=2', 'group=2', 'chunks=[4]', 'eval_n=12',
                  'eval_every=1', 'n_train=60', 'probe_n=8'])
    assert rc == 0
    rec = json.loads((tmp_path / 'rl.json').read_text())
    assert set(rec['runs']) == {'vanilla', 'chunk 4'} and len(rec['runs']['vanilla']['eval_sampled']) == 3 and rec['sft']['steps_run'] == 6 and len(rec['sft']['probe_curve']) == 2
    assert rec['runs']['chunk 4']['eval_step'] == [0, 1, 2] and (tmp_path / 'rl.png').stat().st_size > 0
    out = capsys.readouterr().out
    assert 'sampling time/step' in out and 'RL gain' in out and (tmp_path / 'table.md').read_text().count('\n') == 7
