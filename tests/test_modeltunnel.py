"""ModelTunnel (nbs/30): muP multipliers against the formulas, the coordinate-check statistic, WSD branches, the
sigmoid fit, the LR-sweep bookkeeping and ScalingBench scoring."""
import math

import pytest
import torch
import torch.nn.functional as F

from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.model import rope_cos_sin
from minicpm4_core.train import mup_param_groups, wsd_lr
from minicpm4_core import modeltunnel as MT

torch.set_num_threads(1)


def family(**kw):
    base = dict(vocab_size=96, num_hidden_layers=2, max_position_embeddings=256)
    return MiniCPM4Config.tiny(**{**base, **kw})   # head_dim 32, kv group 2, dim_model_base 32, ffn ratio 3


def rand_rows(n=48, T=17, V=96, seed=0):
    return torch.randint(0, V, (n, T + 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("width,tied", [(32, True), (128, True), (128, False)])
def test_mup_multipliers_match_formulas(width, tied):
    cfg = MT.transfer(family(tie_word_embeddings=tied), width)
    m, sigma, lr = width / cfg.dim_model_base, cfg.initializer_range, 3e-3
    torch.manual_seed(width)
    model = MT.build_model(cfg, 'mup')
    # init std per role (formula: embedding sigma, matrices sigma / sqrt(m), norms 1)
    for name, p in model.named_parameters():
        if p.dim() < 2: assert torch.equal(p, torch.ones_like(p)), name
        elif 'embed_tokens' in name: assert abs(p.std().item() / sigma - 1) < 0.05, name
        else: assert abs(p.std().item() / (sigma / math.sqrt(m)) - 1) < 0.08, name
    # per-group AdamW LR (formula: hidden lr / m, everything else lr)
    lr_of = {id(p): g['lr'] for g in mup_param_groups(model, lr) for p in g['params']}
    for name, p in model.named_parameters():
        want = lr / m if (p.dim() >= 2 and 'embed_tokens' not in name and not name.startswith('lm_head')) else lr
        assert lr_of[id(p)] == pytest.approx(want, rel=1e-12), name
    # forward multipliers, measured: embedding x scale_emb, residual branches x scale_depth/sqrt(L), logits / m
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    seen = {}
    model.model.layers[0].register_forward_pre_hook(lambda mod, a: seen.__setitem__('h0', a[0]))
    with torch.no_grad():
        logits, h = model(ids, return_hidden=True)
        assert torch.allclose(seen['h0'], model.model.embed_tokens.weight[ids] * cfg.scale_emb)
        assert torch.allclose(logits, model.model.norm(h) @ model.lm_head.weight.T / m, atol=1e-5)
        layer, x = model.model.layers[0], torch.randn(2, 9, width)
        cos, sin = rope_cos_sin(cfg, torch.arange(9))
        r = cfg.scale_depth / math.sqrt(cfg.num_hidden_layers)
        mid = x + layer.self_attn(layer.input_layernorm(x), cos, sin) * r
        want = mid + layer.mlp(layer.post_attention_layernorm(mid)) * r
        assert torch.allclose(layer(x, cos, sin), want, atol=1e-5)
    rows = {r['name']: r for r in MT.mup_table(model, lr)}
    assert rows['model.layers.0.mlp.down_proj.weight']['lr'] == pytest.approx(lr / m)


def test_sp_model_is_mup_without_multipliers():
    cfg = MT.transfer(family(), 128)
    mup, sp = MT.build_model(cfg, 'mup', seed=3), MT.build_model(cfg, 'sp', seed=3)
    for (n, a), (_, b) in zip(mup.state_dict().items(), sp.state_dict().items()): assert torch.equal(a, b), n
    assert MT.width_mult(sp) == 1 and MT.width_mult(mup) == 4
    assert all(g['lr'] == 1e-2 for g in mup_param_groups(sp, 1e-2))
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad(): assert torch.allclose(sp(ids), mup(ids) * 4, atol=1e-5)   # the logit multiplier is all that differs
    with pytest.raises(ValueError, match="parametrization"): MT.build_model(cfg, 'ntk')


def test_transfer_shapes_and_errors():
    tiny = MiniCPM4Config.tiny()
    c = MT.transfer(tiny, 256)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (256, 8, 4, 32, 768)
    assert (c.dim_model_base, c.scale_emb, c.scale_depth, c.num_hidden_layers) == (32, 12.0, 1.4, 4)
    back = MT.transfer(MT.transfer(tiny, 32), 128, kv_group=2)
    assert back.to_dict() == tiny.to_dict()
    assert MT.transfer(tiny, 32).num_key_value_heads == 1
    for bad in (48, 96, 0, -64, 64.0, True):
        with pytest.raises(ValueError, match="width"): MT.transfer(tiny, bad)


def test_coord_spread_statistic():
    rec = {32: dict(a=[1.0, 2.0], b=[1.0, 1.0]), 64: dict(a=[1.0, 3.0], b=[1.0, 4.0]), 128: dict(a=[1.0, 6.0], b=[1.0, 2.0])}
    assert MT.coord_spread(rec) == dict(a=3.0, b=4.0)
    assert MT.coord_spread(rec, 0) == dict(a=1.0, b=1.0)


def test_coord_check_two_widths_mup_flat_sp_not():
    rows = rand_rows(48, 16)
    out = {}
    for par in ('mup', 'sp'):
        rec = MT.coord_check(lambda w: MT.build_model(MT.transfer(family(), w), par), [32, 256], rows, steps=6,
                             lr=1e-2, batch_size=4, progress=False)
        assert set(rec[32]) == {'embedding', 'layer0', 'layer1', 'attn_logits0', 'attn_logits1', 'logits'}
        assert all(len(v) == 7 for v in rec[32].values())
        out[par] = MT.coord_spread(rec)
    # the embedding is width-independent in both; muP keeps every hidden quantity flat, SP's layer outputs grow.
    # (muP's initial logits shrink like 1/sqrt(width) and random tokens teach little in 6 steps: logits only compared)
    assert out['mup']['embedding'] < 1.3 and out['sp']['embedding'] < 1.3
    assert max(v for k, v in out['mup'].items() if k != 'logits') < 1.5
    assert out['sp']['layer1'] > 3 * out['mup']['layer1'] and max(out['sp'].values()) > 4
    assert out['sp']['logits'] > out['mup']['logits']


def test_attention_logit_hook_matches_direct_computation():
    cfg = MT.transfer(family(), 64)
    model = MT.build_model(cfg, seed=1)
    store, hooks = MT.activation_sizes(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    q_in = {}
    model.model.layers[1].self_attn.register_forward_hook(lambda m, a, o: q_in.__setitem__('x', a[0]))
    with torch.no_grad():
        model(ids)
        att = model.model.layers[1].self_attn
        x = q_in['x']
        cos, sin = rope_cos_sin(cfg, torch.arange(11))
        from minicpm4_core.model import apply_rope
        q = apply_rope(att.q_proj(x).view(2, 11, cfg.num_attention_heads, 32), cos, sin)
        k = apply_rope(att.k_proj(x).view(2, 11, cfg.num_key_value_heads, 32), cos, sin)
        vals = []
        for b in range(2):
            for h in range(cfg.num_attention_heads):
                kh = k[b, :, h // cfg.num_key_value_groups]
                for t in range(11):
                    vals.append((q[b, t, h] @ kh[:t + 1].T / math.sqrt(32)).abs())
        want = torch.cat(vals).mean().item()
    assert store['attn_logits1'] == pytest.approx(want, rel=1e-4)
    for h in hooks: h.remove()


def test_wsd_branch_is_the_run_with_that_budget():
    rows = rand_rows(40, 16, seed=5)
    cfg = MT.transfer(family(), 32)
    snaps = []
    br = MT.wsd_branches(MT.build_model(cfg, seed=0), rows, lr=1e-2, branch_at=[12, 24], decay_frac=0.25, warmup=4,
                         batch_size=4, evaluate=lambda m: {k: v.clone() for k, v in m.state_dict().items()}, progress=False)
    assert [(b['step'], b['total']) for b in br] == [(12, 16), (24, 32)]
    for b in br:
        full = MT.build_model(cfg, seed=0)
        sched = MT.Schedule(b['total'], 4, b['total'] - b['step'])
        assert [sched(s) for s in range(b['step'])] == [wsd_lr(s, 1000, 4, 0) for s in range(b['step'])]
        assert sched(b['total'] - 1) == pytest.approx(0.05)      # decayed to final_ratio at the last step
        MT.train_proxy(full, rows, lr=1e-2, steps=b['total'], batch_size=4, schedule=sched)
        for k, v in full.state_dict().items():
            assert torch.allclose(v, b['decayed'][k], atol=1e-6, rtol=1e-5), k
        assert not torch.allclose(b['stable']['model.norm.weight'], b['decayed']['model.norm.weight'])


def test_fit_sigmoid_recovers_known_parameters():
    g = torch.Generator().manual_seed(11)
    true = dict(c=0.6, g=-5.0, l=1.5, d=0.1)
    L = torch.rand(16, generator=g, dtype=torch.float64) * 1.6 + 0.7
    acc = (MT.sigmoid_acc(L, **true) + 0.01 * torch.randn(16, generator=g, dtype=torch.float64)).clamp(0, 1)
    acc[3] = 0.95   # one outlier: the soft-L1 loss should shrug it off
    fit = MT.fit_sigmoid(L, acc, n_boot=64, seed=0)
    p = fit.params
    assert p['c'] == pytest.approx(0.6, abs=0.05) and p['d'] == pytest.approx(0.1, abs=0.03)
    assert p['l'] == pytest.approx(1.5, abs=0.05) and p['g'] == pytest.approx(-5.0, rel=0.25)
    lo, hi = fit.interval(1.3)
    assert lo <= float(MT.sigmoid_acc(1.3, **true)) + 0.01 and hi >= float(MT.sigmoid_acc(1.3, **true)) - 0.01 and hi - lo < 0.15
    with pytest.raises(ValueError, match="pairs"): MT.fit_sigmoid([1, 2, 3], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"): MT.fit_sigmoid([1, 2, 3, 4], [0.1, 0.2, 1.3, 0.3])


def test_sweep_best_and_refinement():
    lrs = [2.0 ** k for k in range(-9, -3)]
    true = 2 ** -6.3
    table = [dict(width=w, lr=lr, valid_loss=1 + 0.1 * (math.log2(lr) - math.log2(true * s)) ** 2)
             for w, s in ((32, 1.0), (128, 0.5)) for lr in lrs]
    res = MT.SweepResult(table)
    b = res.best()
    assert b[32][0] == 2 ** -6 and b[32][1] == pytest.approx(true, rel=1e-9)
    assert b[128][1] == pytest.approx(true / 2, rel=1e-9)
    assert res.transfer_gap() == pytest.approx(-1.0)


def test_search_hparams_runs_the_grid():
    rows, valid = rand_rows(40, 16, seed=1), rand_rows(8, 16, seed=2)
    res = MT.search_hparams(lambda w: MT.build_model(MT.transfer(family(), w)), [32, 64], [1e-3, 1e-2], rows, valid,
                            steps=3, batch_size=4, progress=False, depth=2)
    assert [(r['width'], r['lr'], r['depth']) for r in res.table] == [(32, 1e-3, 2), (32, 1e-2, 2), (64, 1e-3, 2), (64, 1e-2, 2)]
    assert all(math.isfinite(r['valid_loss']) for r in res.table)
    with pytest.raises(ValueError, match="lrs"): MT.search_hparams(lambda w: None, [32], [-1.0], rows, valid, steps=1)
    with pytest.raises(ValueError, match="lr"): MT.train_proxy(MT.build_model(MT.transfer(family(), 32)), rows, lr=0, steps=1)


class _Tok:
    "Character tokenizer: ids 4.. are characters; bos 1, eos 2, pad 0."
    bos_id, eos_id, pad_id = 1, 2, 0
    chars = sorted(set("0123456789 +=?.,:ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
    def encode(self, s): return [4 + self.chars.index(c) for c in s]
    def decode(self, ids): return ''.join(self.chars[i - 4] for i in ids if i >= 4)


def test_scalingbench_loss_matches_per_item_reference():
    tok = _Tok()
    items = MT.scalingbench_items(n_arith=5, max_digits=2, facts=False, seed=3)
    items.append(dict(kind='fact', prompt='Question: Who? Answer:', target=' Tolmen', answer='Tolmen'))
    cfg = MiniCPM4Config.tiny(vocab_size=4 + len(tok.chars), num_hidden_layers=1, hidden_size=64, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=128)
    model = MT.build_model(cfg, seed=0)
    got = MT.scalingbench_loss(model, tok, items, batch_size=4, per_kind=True, reduction='token')
    got_item = MT.scalingbench_loss(model, tok, items, batch_size=4, reduction='item')
    tot, n, per, item_means = 0.0, 0, {}, []
    with torch.no_grad():
        for it in items:
            p, t = [1] + tok.encode(it['prompt']), tok.encode(it['target'])
            logits = model(torch.tensor([p + t]))[0]
            nll = F.cross_entropy(logits[len(p) - 1:-1], torch.tensor(t), reduction='sum').item()
            tot += nll; n += len(t); item_means.append(nll / len(t))
            k = per.setdefault(it['kind'], [0.0, 0]); k[0] += nll; k[1] += len(t)
    assert got['all'] == pytest.approx(tot / n, rel=1e-5)
    for k, (s, c) in per.items(): assert got[k] == pytest.approx(s / c, rel=1e-5)
    assert got_item == pytest.approx(sum(item_means) / len(item_means), rel=1e-5)
    with pytest.raises(ValueError, match="reduction"): MT.scalingbench_loss(model, tok, items, reduction='sum')


def test_task_accuracy_scores_final_answers():
    tok = _Tok()
    items = MT.scalingbench_items(n_arith=4, facts=False, seed=7)
    items.append(dict(kind='fact', prompt='Question: Who? Answer:', target=' Tolmen', answer='Tolmen'))

    class Oracle:   # writes the gold continuation, with a wrong final answer for the first `wrong` items
        def __init__(self, wrong): self.wrong, self.seen = wrong, 0
        def generate(self, prompts, max_new, stop_ids):
            out = []
            for it in items[self.seen:self.seen + len(prompts)]:
                t = it['target']
                if self.seen < self.wrong:
                    t = t.replace(f"Answer: {it['answer']}", f"Answer: {int(it['answer']) + 1}") if it['kind'] == 'arith' else ' Bob'
                out.append(tok.encode(t) + [2]); self.seen += 1
            return out
    assert MT.task_accuracy(Oracle(0), tok, items, batch_size=2) == 1.0
    acc = MT.task_accuracy(Oracle(2), tok, items, batch_size=2, per_kind=True)
    assert acc['arith'] == 0.5 and acc['fact'] == 1.0 and acc['all'] == pytest.approx(3 / 5)


def test_fit_sigmoid_binomial_recovers_curve_and_intervals_cover():
    g = torch.Generator().manual_seed(5)
    true = dict(c=0.7, g=-4.0, l=1.4, d=0.05)
    L = torch.rand(20, generator=g, dtype=torch.float64) * 1.4 + 0.7
    n = torch.randint(150, 400, (20,), generator=g).double()
    acc = torch.binomial(n, MT.sigmoid_acc(L, **true), generator=g) / n     # k right out of n items
    fit = MT.fit_sigmoid(L, acc, n_boot=100, seed=0, n_items=n)
    assert fit.method == 'binomial' and 0.3 < fit.dispersion < 3          # binomial scatter: chi^2/dof near 1
    xs = torch.linspace(1.0, 1.8, 5)                                           # inside the points' range
    assert (fit.predict(xs) - MT.sigmoid_acc(xs, **true)).abs().max() < 0.035
    t = float(MT.sigmoid_acc(1.3, **true))
    lo, hi = fit.interval(1.3); plo, phi = fit.prediction_interval(1.3, 300)
    assert lo - 0.01 <= t <= hi + 0.01 and plo <= lo and phi >= hi             # a measurement adds its own binomial noise
    se = math.sqrt(t * (1 - t) / 300)
    assert 2 * 1.2 * se < phi - plo < 2 * 3 * se                               # ~ +-1.645 sqrt(curve^2 + binomial^2)
    with pytest.raises(ValueError, match="n_items"): MT.fit_sigmoid(L, acc, n_items=0)


def _ev(losses, accs, ns, text):
    return dict(sb_loss=dict(losses, all=sum(losses.values()) / len(losses)), acc=dict(accs, all=sum(accs[k] * ns[k] for k in accs) / sum(ns.values())),
                n=dict(ns, all=sum(ns.values())), text_loss=text)


def test_predict_accuracy_combines_per_kind_sigmoids():
    g = torch.Generator().manual_seed(2)
    tr = dict(a=dict(c=0.8, g=-5.0, l=1.0, d=0.02), b=dict(c=0.6, g=-3.0, l=1.6, d=0.1))
    ns = dict(a=400, b=250)
    def model(La, Lb):
        acc = {k: float(torch.binomial(torch.tensor(float(ns[k])), MT.sigmoid_acc(L, **tr[k]).float(), generator=g)) / ns[k]
               for k, L in (('a', La), ('b', Lb))}
        return _ev(dict(a=La, b=Lb), acc, ns, text=(La + Lb) / 2)
    pts = [model(float(x), float(x) + 0.5 + 0.3 * float(torch.rand(1, generator=g))) for x in torch.linspace(0.5, 1.7, 14)]
    held = model(0.95, 1.55)
    r = MT.predict_accuracy(pts, held, 'sb_loss', n_boot=60)
    want = sum(ns[k] * float(MT.sigmoid_acc(L, **tr[k])) for k, L in (('a', 0.95), ('b', 1.55))) / 650
    assert r['kinds'] == ['a', 'b'] and abs(r['pred'] - want) < 0.03
    assert r['measured'] == pytest.approx(held['acc']['all']) and r['err'] == pytest.approx(r['pred'] - r['measured'])
    assert r['pred'] == pytest.approx(sum(ns[k] * r['per_kind'][k]['pred'] for k in ns) / 650)
    assert r['plo'] <= r['lo'] <= r['pred'] <= r['hi'] <= r['phi']
    assert r['se'] == pytest.approx(math.sqrt(sum(ns[k] * r['per_kind'][k]['pred'] * (1 - r['per_kind'][k]['pred']) for k in ns)) / 650)
    one = MT.predict_accuracy(pts, held, 'text_loss', kinds=['all'], method='robust', n_boot=20)
    assert one['kinds'] == ['all'] and one['measured'] == pytest.approx(held['acc']['all'])
    with pytest.raises(ValueError, match="kinds"): MT.predict_accuracy(pts, held, kinds=['c'])
    with pytest.raises(ValueError, match="method"): MT.predict_accuracy(pts, held, method='ols')


def test_run_steps_reads_loss_in_blocks_with_same_result_and_divergence():
    rows = rand_rows(40, 16, seed=3)
    cfg = MT.transfer(family(), 32)
    out = {}
    for every in (1, 4):
        m = MT.build_model(cfg, seed=0); opt = MT.make_optimizer(m, 1e-2)
        out[every] = (MT.run_steps(m, opt, rows, 1e-2, lambda s: 1.0, 0, 10, 4, check_every=every), m.state_dict())
    assert out[1][0] == pytest.approx(out[4][0], rel=1e-6) and len(out[1][0]) == 10
    for k, v in out[1][1].items(): assert torch.allclose(v, out[4][1][k]), k
    for every in (1, 4):   # a huge LR diverges: the run stops with inf as its last loss
        m = MT.build_model(cfg, seed=0); opt = MT.make_optimizer(m, 1e4)
        with torch.no_grad(): m.lm_head.weight.mul_(1e30)
        ls = MT.run_steps(m, opt, rows, 1e4, lambda s: 1.0, 0, 12, 4, check_every=every)
        assert ls[-1] == math.inf and len(ls) < 12


def test_mtconfig_profiles_and_notebook_defaults():
    import ast, json
    from pathlib import Path
    assert MT.MTConfig.for_profile('ci') == MT.MTConfig()
    gpu = MT.MTConfig.for_profile('gpu')
    assert gpu.device == 'cuda' and gpu.lr_widths[-1] / gpu.lr_widths[0] >= 8 and gpu.coord_widths[-1] / gpu.coord_widths[0] >= 8
    with pytest.raises(ValueError, match="unknown MTConfig fields"): MT.MTConfig.for_profile('ci', widths=[1])
    nb = json.loads((Path(__file__).parents[1] / 'nbs' / '30_modeltunnel.ipynb').read_text())
    cell = next(c for c in nb['cells'] if 'parameters' in c.get('metadata', {}).get('tags', []))
    params = {t.targets[0].id: ast.literal_eval(t.value) for t in ast.parse(''.join(cell['source'])).body}
    mt = {k[3:]: v for k, v in params.items() if k.startswith('mt_') and k not in MT._NOTEBOOK_ONLY}
    assert set(mt) == set(MT.MTConfig.__dataclass_fields__) - {'profile', 'device', 'seed', 'corpus_size', 'vocab_size', 'model_preset'}
    assert MT.MTConfig(**mt) == MT.MTConfig()


def test_prepared_tokenizer_matches_the_real_one():
    from minicpm4_core import data as D
    tok = D.train_tokenizer(D.embedded_corpus(0, 300)['train'] + ['caf\u00e9 \u00fcber na\u00efve \u2713'], 300)
    vocab = [None] * tok.vocab_size
    for s, i in tok.tk.get_vocab().items(): vocab[i] = s
    texts = ['Question: Where does Bo live? Answer: Tolmen', 'Problem: 47 + 85 = ? Steps:', 'caf\u00e9 \u2713']
    pt = MT.PreparedTokenizer(vocab, {t: tok.encode(t) for t in texts}, tok.bos_id, tok.eos_id, tok.pad_id, [0, 1, 2, 3])
    g = torch.Generator().manual_seed(4)
    for _ in range(300):   # any ids, including ones that split a multi-byte character
        ids = torch.randint(0, tok.vocab_size, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
        assert pt.decode(ids) == tok.decode(ids), ids
    assert all(pt.encode(t) == tok.encode(t) for t in texts) and pt.vocab_size == tok.vocab_size
    with pytest.raises(KeyError, match="prepared"): pt.encode('something else')


def test_main_tiny_runs_every_stage_without_tokenizers(tmp_path, capsys, monkeypatch):
    import sys
    args = ['--profile', 'gpu', '--tiny', '--set', 'boot=8', 'n_arith=4', 'branch_at=[6, 10]', 'coord_widths=[32, 64]']
    assert MT.main(args + ['--prepare', str(tmp_path / 'data.pt')]) == 0
    monkeypatch.setitem(sys.modules, 'tokenizers', None)        # the device image has no tokenizers package
    with pytest.raises(ImportError, match="--prepare"): MT.main(args + ['--out', str(tmp_path)])
    with pytest.raises(ValueError, match="prepared for"): MT.main(args + ['--out', str(tmp_path), '--data', str(tmp_path / 'data.pt'), '--set', 'n_arith=5'])
    data = ['--data', str(tmp_path / 'data.pt')]
    assert MT.main(args + ['--out', str(tmp_path / 'a'), '--stages', 'coord', 'lr'] + data) == 0   # a run cut after two stages
    import json
    first = json.loads((tmp_path / 'a' / 'modeltunnel.json').read_text())
    assert {'coord_check', 'lr_transfer'} <= set(first) and 'scalingbench' not in first
    with pytest.raises(ValueError, match="other settings"):
        MT.main(args[:3] + ['--set', 'sweep_steps=4', 'n_arith=4', '--out', str(tmp_path), '--resume', str(tmp_path / 'a' / 'modeltunnel.json')] + data)
    capsys.readouterr()
    assert MT.main(args + ['--out', str(tmp_path), '--resume', str(tmp_path / 'a' / 'modeltunnel.json')] + data) == 0
    res = json.loads((tmp_path / 'modeltunnel.json').read_text())
    assert {'coord_check', 'lr_transfer', 'wsd', 'scalingbench', 'checks'} <= set(res) and len(res['calls']) == 2
    assert res['coord_check'] == first['coord_check'] and res['calls'][1]['stages'] == ['sb', 'checks']
    assert res['wsd']['lr'] == first['lr_transfer']['mup']['32'][1]      # the ladder runs at the resumed sweep's optimum
    assert res['config']['device'] == 'cpu' and res['scalingbench']['heldout']['n']['all'] == 244
    assert {p.name for p in tmp_path.glob('*.png')} == {'wsd.png', 'scalingbench.png'}      # this call's stages
    lines = capsys.readouterr().out.splitlines()
    for head in ('coordinate check', 'LR transfer', 'ScalingBench: held-out', 'ScalingBench residuals', 'WSD', 'what else'):
        assert sum(l.startswith(head) for l in lines) == 1, head
