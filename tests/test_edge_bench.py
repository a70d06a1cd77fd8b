"""minicpm4_core.edge_bench (session 7 parts): the sparse speculative rows (the trained pair past dense_len, here a
fresh random tiny pair in fp32, where speculation must reproduce the plain engine exactly), their prompts, the spec
overrides, the transformers dynamic-cache baseline, and the table / goal / plot lines that show them (CPU, seconds)."""
import time

import pytest
import torch

from minicpm4_core import edge_bench as EB
from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.model import MiniCPM4ForCausalLM

pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.filterwarnings('ignore:.*using the torch reference')]
TREE = dict(method='tree', depth=6, topk=4, tree_size=16)


def pair(seed, quant=None, sparse=True):
    "A tiny InfLLM v2 target (the long rows' tiny sparse_config: sparse from 64 keys) and a random EAGLE draft, fp32."
    from minicpm4_core.frspec import EagleDraft
    torch.manual_seed(seed)
    c = MiniCPM4Config.tiny(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128, initializer_range=0.3, torch_dtype='float32',
                            sparse_config=EB._long_sparse_config(EB.SpecParams.smoke()) if sparse else None)
    t = MiniCPM4ForCausalLM(c).eval()
    if quant:
        from minicpm4_core.engine import convert_quant
        convert_quant(t, quant)
    return t, EagleDraft(c).eval()


def ids(seed, n):
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize('quant,kw,fr', [(None, TREE, True), ('w4a16', TREE, True),
                                         (None, dict(method='tree', depth=5, topk=4, tree_size=16), False)])
def test_spec_long_rows_past_dense_len_are_exact_in_fp32(quant, kw, fr, torch_kernels):
    "Plain engine, then FR-Spec, over prompts past dense_len (64): fp32 outputs identical, timings and stats filled."
    t, d = pair(3 + (quant is not None), quant)
    prompts = {100: [ids(1, 100)], 150: [ids(2, 150), ids(3, 150)]}
    vocab = torch.arange(60) if fr else None                          # an FR-Spec head of the 60 first ids, or the full head
    rows, notes = EB.spec_long_rows(t, d, vocab, prompts, 9, kw, 'tree6x4/16', 32, tag='sparse+int4' if quant else 'sparse',
                                    log=lambda s: None)
    assert notes == []
    assert [(r['name'], r['context'], r['prompts']) for r in rows] == [
        (f'{n}', 100, 1) for n in ['sparse+int4' if quant else 'sparse']] + [(rows[0]['name'], 150, 2)] + [
        (rows[0]['name'] + '+spec tree6x4/16', c, k) for c, k in ((100, 1), (150, 2))]
    plain, spec = rows[:2], rows[2:]
    for r in rows:
        assert r['ttft_s'] > 0 and r['wall_s'] > r['ttft_s'] and r['decode_tok_s'] > 0 and r['new'] == 9
    for r in plain:
        assert r['spec'] is None and r['mean_accept_length'] == 1.0 and 0 < r['distinct4'] <= 1
    for r in spec:
        assert r['identical'] == r['prompts'] and r['tokens'] == 1.0 and r['first_diff'] == []   # exact in fp32
        assert r['mean_accept_length'] >= 1.0 and r['spec_path'] is not None and r['ttft_source'] == 'engine'
        base = next(p for p in plain if p['context'] == r['context'])
        assert r['speedup'] == pytest.approx(r['decode_tok_s'] / base['decode_tok_s'])


def test_spec_long_rows_draft_windows():
    """One speculative variant per draft window (labelled, recorded), each exact in fp32; SpecParams reads the list."""
    t, d = pair(3)
    rows, notes = EB.spec_long_rows(t, d, torch.arange(60), {150: [ids(2, 150)]}, 9, TREE, 'tree6x4/16', 32,
                                    tag='sparse', log=lambda s: None, windows=(None, 12))
    assert notes == [] and [(r['name'], r['draft_window']) for r in rows] == [
        ('sparse', None), ('sparse+spec tree6x4/16', None), ('sparse+spec tree6x4/16 w12', 12)]
    assert all(r['identical'] == 1 and r['first_diff'] == [] for r in rows[1:])
    assert EB.SpecParams(long_draft_windows='0,256').long_windows() == [None, 256]
    with pytest.raises(ValueError, match='long_draft_windows'): EB.SpecParams(long_draft_windows='-1').long_windows()


def test_spec_long_rows_budget_and_prompts():
    "A spent deadline skips every generation with a note; the prompts are windows of the held-out stream (train if short)."
    t, d = pair(5)
    rows, notes = EB.spec_long_rows(t, d, None, {100: [ids(1, 100)]}, 6, TREE, 'x', 32, deadline=time.time() - 1,
                                    log=lambda s: None)
    assert rows == [] and len(notes) == 2 and all('skipped (budget' in n for n in notes)

    class Tok:
        bos_id, eos_id = 1, 2
        def encode_batch(self, texts): return [[3 + ord(ch) % 50 for ch in s] for s in texts]
    held, train = ['abcdefghij' * 3], ['klmnopqrst' * 10]                 # 32 held-out tokens with <s> </s>
    got, src = EB._long_prompts(Tok(), held, train, [20, 30], 3)
    assert src.startswith('held-out,') and [len(p) for p in got[20] + got[30]] == [20] * 3 + [30] * 3
    assert got[20][0][0] == 1 and got[20][-1][-1] == 2 and got[30][0] != got[30][1]          # first and last windows
    got, src = EB._long_prompts(Tok(), held, train, [60], 2)
    assert 'train' in src and [len(p) for p in got[60]] == [60, 60]
    with pytest.raises(ValueError, match='tokens, a 500-token prompt'): EB._long_prompts(Tok(), held, train, [500], 1)


def test_spec_overrides_with_commas_and_names():
    p = EB.EdgeParams(spec='train_s=7,long_contexts=16384,32000,configs=chain4 FR,tree6x8/32 FR,long_new=64,int4=False',
                      device='cuda').checked().spec_params()
    assert (p.train_s, p.long_ints(), p.names(), p.long_new, p.int4) == (7, [16384, 32000], ['chain4 FR', 'tree6x8/32 FR'], 64, False)
    assert EB.SpecParams().names() == [c[0] for c in EB.SPEC_CONFIGS] and EB.SpecParams(long_contexts='').long_ints() == []
    with pytest.raises(ValueError, match='spec configs: unknown'): EB.EdgeParams(spec='configs=tree9').checked()
    with pytest.raises(ValueError, match='spec configs: unknown'): EB.EdgeParams(spec='long_config=tree9').checked()
    with pytest.raises(ValueError, match='spec: expected'): EB.EdgeParams(spec='long_contexts').checked()


def test_hf_dynamic_cache_baseline():
    "transformers with its dynamic cache decodes the same greedy tokens as with the static cache; the sweep runs it."
    pytest.importorskip('transformers')
    c = EB.preset('tiny', 64, 'float32')
    hf, _ = EB.hf_model(c, 64, torch.device('cpu'), torch.float32)
    torch.manual_seed(0)
    for p_ in hf.parameters(): p_.data.normal_(0, 0.3)                  # not the near-constant init: distinct tokens
    ps = [ids(7, 20)]
    out = {cache: EB.hf_gen(hf, torch.device('cpu'), False, cache)(ps, 8, EB._Marks(torch.device('cpu')))[0, 20:].tolist()
           for cache in ('static', 'dynamic')}
    assert out['static'] == out['dynamic'] and len(set(out['static'])) > 1
    with pytest.raises(ValueError, match='cache must be'): EB.hf_gen(hf, 'cpu', False, 'paged')
    p = EB.EdgeParams(contexts='30', batches='1,2', new_tokens=3, parts='decode', configs='hf-dynamic').checked()
    rows, notes = EB.run_decode(p, progress=False)
    assert notes == [] and [(r['batch'], r['decode_steps']) for r in rows] == [(1, 3), (2, 3)]
    assert all(r['backend'].startswith('transformers dynamic cache') and r['decode_tok_s'] > 0 for r in rows)


def test_long_rows_in_table_goals_and_plot():
    "The long rows reach table.md's lines, the goal lines (sparse + int4 + spec vs sparse + int4) and the decode plot."
    row = lambda name, spec, q, ctx, tok, **kw: dict(name=name, spec=spec, quant=q, context=ctx, prompts=2, new=128,
                                                     ttft_s=0.5, ttft_source='engine', wall_s=1.0, tok_s=200.0,
                                                     decode_tok_s=tok, mean_accept_length=1.0, spec_path=None, **kw)
    long = [row('sparse+int4', None, 'w4a16', 16384, 700.0, distinct4=0.4, backend='static'),
            row('sparse+int4', None, 'w4a16', 32000, 650.0, distinct4=0.5, backend='static'),
            row('sparse+int4+spec t', 't', 'w4a16', 16384, 1400.0, speedup=2.0, e2e_speedup=1.3, identical=1, prefix=0.7),
            row('sparse+int4+spec t', 't', 'w4a16', 32000, 975.0, speedup=1.5, e2e_speedup=1.1, identical=2, prefix=1.0)]
    long[3].update(mean_accept_length=4.5, spec_path='graphs')
    sr = lambda name, tok, dtok, **kw: dict(name=name, tok_s=tok, decode_tok_s=dtok, speedup=tok / 1000, mean_accept_length=5.0,
                                            identical=8, prompts=8, **kw)
    short = [sr('plain', 1000.0, 1100.0), sr('tree', 1900.0, 2530.0, decode_speedup=2.3), sr('chain', 2000.0, 2200.0, decode_speedup=2.0)]
    res = dict(rows=[], kernel_rows=[], notes=[], params=dict(device='cuda'), env={}, seconds={},
               spec=dict(rows=short, long_rows=long, long_notes=['one skipped'], corpus=dict(source='austen'),
                         target=dict(shape='s', steps=1, seconds=1.0, loss_first=9.0, loss_last=3.0, heldout_loss=3.5),
                         draft=dict(steps=1, loss_first=5.0, loss_last=1.0)))
    lines = EB.summary_lines(res)
    assert sum('spec long' in l for l in lines) == 5 and any('x1.50 decode' in l and '[graphs]' in l for l in lines)
    assert any('x1.90 vs no speculation (decode 2530 tok/s, x2.30)' in l for l in lines)
    f = [l for l in EB.goal_lines(res) if 'trained 0.5B pair' in l]       # decode alone wins over the wall clock
    assert len(f) == 1 and '2.30 (goal >= 2.0) met (tree, accept 5.00) decode alone; x1.90 wall' in f[0]
    g = [l for l in EB.goal_lines(res) if 'past dense_len' in l]
    assert len(g) == 1 and '1.50 (goal >= 2.0) MISSED' in g[0] and 'ctx 32000' in g[0] and 'accept 4.50' in g[0]
    fig = EB.plot(dict(res, params=dict(device='cpu')))
    labels = [l.get_label() for l in fig.axes[0].get_lines()]
    assert labels == ['0.5B trained pair: sparse+int4', '0.5B trained pair: sparse+int4+spec t']
    assert list(fig.axes[0].get_lines()[1].get_ydata()) == [1400.0, 975.0]


def test_spec_rows_time_decode_alone():
    "The short-context rows: wall clock and decode alone (the engine's / the spec object's decode_s), fp32-identical."
    t, d = pair(9, sparse=False)                                       # a dense target: FastSpec's path
    rows = EB.spec_rows(t, d, torch.arange(60), [ids(4, 20), ids(5, 30)], 8,
                        tuple(c for c in EB.SPEC_CONFIGS if c[0] in ('chain6 FR', 'tree5x4/16 full')))
    assert [r['name'] for r in rows] == ['plain', 'chain6 FR', 'tree5x4/16 full']
    for r in rows:
        assert r['identical'] == 2 and r['decode_tok_s'] > 0 and r['tok_s'] > 0
    for r in rows[1:]:
        assert r['decode_speedup'] == pytest.approx(r['decode_tok_s'] / rows[0]['decode_tok_s'])
