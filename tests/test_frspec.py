"""FR-Spec: frequency vocabulary, EAGLE-style draft, speculative decoding (reference and static fast path).

Greedy speculative output must equal the target's greedy output token for token; in sampling mode the output
distribution must equal the target's (chi-square), and a deliberately wrong acceptance rule must fail that test."""
import itertools

import pytest
import torch

from minicpm4_core import frspec as S
from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.model import MiniCPM4ForCausalLM
from minicpm4_core.train import TrainConfig


def tiny_cfg(**kw):
    base = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, initializer_range=0.5, torch_dtype='float32', eos_token_id=2)
    return MiniCPM4Config.tiny(**{**base, **kw})


@pytest.fixture(scope='module')
def pair(one_thread):
    "A peaked random tiny target and a draft trained on its own greedy text (acceptance well above 1)."
    torch.manual_seed(0)
    target = MiniCPM4ForCausalLM(tiny_cfg()).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(4, 96, (64, 6), generator=g).tolist()
    rows = S.self_distill_rows(target, prompts, 40, progress=False)
    draft = S.EagleDraft(target.config)
    S.train_draft(draft, target, rows, TrainConfig(steps=160, batch_size=16, lr=1e-2, progress=False, eval_every=10**6))
    return target, draft.eval()


pytestmark = pytest.mark.usefixtures('one_thread')     # tests/conftest.py


# the first three are prompts the draft was trained on (it has seen the target continue them: high acceptance,
# so long accepted paths are exercised); the last ones are new
PROMPTS = torch.randint(4, 96, (3, 6), generator=torch.Generator().manual_seed(1)).tolist() + \
    [[1, 20, 30, 40, 50, 60], [1, 3]]


# ---------------------------------------------------------------- frequency vocabulary
class WordTok:
    "Whitespace tokenizer over a fixed word list (id = index)."
    def __init__(self, words): self.ix = {w: i for i, w in enumerate(words)}; self.vocab_size = len(words)
    def encode(self, text): return [self.ix[w] for w in text.split()]


def test_count_frequencies_and_force_eos(tmp_path):
    words = ['<pad>', '<s>', '</s>', 'a', 'b', 'c', 'd', 'e']
    tok = WordTok(words)
    texts = ['a a a b', 'a b c', 'a d', 'b b'] * 3
    counts = S.count_token_frequencies(iter(texts), tok, eos_id=2, batch_size=5, progress=False)
    want = torch.zeros(8, dtype=torch.long)
    for t in texts:
        for i in tok.encode(t): want[i] += 1
        want[2] += 1
    assert torch.equal(counts, want)
    assert torch.equal(S.count_token_frequencies(texts, tok, max_texts=4, progress=False),
                       S.count_token_frequencies(texts[:4], tok, progress=False))
    ids = S.frequent_ids(counts, 3)
    assert ids.tolist() == [3, 2, 4]                       # a (15), </s> (12), b (12): ties -> smaller id first
    ids = S.frequent_ids(counts, 2, force_ids=[7])         # e never occurs; forced in, replacing the 2nd
    assert ids.tolist() == [3, 7]
    fv = S.build_freq_vocab(counts, 3, eos_ids=[7], corpus='test')
    assert 7 in fv.ids.tolist() and fv.k == 3
    assert fv.coverage == pytest.approx(float(counts[fv.ids].sum()) / float(counts.sum()))
    p = fv.save(tmp_path / 'v.safetensors')
    fv2 = S.FreqVocab.load(p)
    assert torch.equal(fv2.ids, fv.ids) and torch.equal(fv2.counts, fv.counts)
    assert fv2.forced == [7] and fv2.meta['corpus'] == 'test'
    cov = S.coverage_curve(counts, [1, 2, 8])
    assert cov[0] == pytest.approx(15 / float(counts.sum())) and cov[-1] == pytest.approx(1.0)


def test_freq_vocab_file_errors_name_the_file(tmp_path):
    "The save is atomic (no temporary left; a failed save keeps the old file); bad files raise naming the path."
    from minicpm4_core.io import IntegrityError
    counts = torch.randint(1, 50, (40,), generator=torch.Generator().manual_seed(3))
    p = S.build_freq_vocab(counts, 8, eos_ids=2).save(tmp_path / 'sub' / 'v.safetensors')
    assert sorted(x.name for x in p.parent.iterdir()) == ['v.safetensors']
    good = p.read_bytes()
    bad = S.FreqVocab(torch.arange(3), counts, meta={'x': object()})            # metadata that is not JSON
    with pytest.raises(TypeError): bad.save(p)
    assert p.read_bytes() == good and sorted(x.name for x in p.parent.iterdir()) == ['v.safetensors']
    with pytest.raises(FileNotFoundError, match='absent.safetensors'): S.FreqVocab.load(tmp_path / 'absent.safetensors')
    p.write_bytes(good[: len(good) // 2])                                        # truncated
    with pytest.raises(IntegrityError, match='v.safetensors'): S.FreqVocab.load(p)
    from safetensors.torch import save_file
    save_file({'ids': torch.arange(3)}, str(p))                                  # not a vocabulary: no counts
    with pytest.raises(IntegrityError, match="v.safetensors.*'counts'"): S.FreqVocab.load(p)


def test_fast_path_on_an_infllmv2_target_while_dense(pair):
    "A sparse target whose contexts stay below dense_len runs on the static path, token for token as its own."
    dense, draft = pair
    sparse = MiniCPM4ForCausalLM(tiny_cfg(sparse_config=dict(kernel_size=4, kernel_stride=2, block_size=4,
                                                             window_size=8, topk=4, dense_len=128))).eval()
    sparse.load_state_dict(dense.state_dict())
    eng = S.FastSpec(sparse, draft, method='tree', depth=3, topk=3, tree_size=8, max_len=96)
    ref = sparse.generate(PROMPTS[0], 24, stop_ids=[])[0]
    assert eng.generate(PROMPTS[0], 24) == ref and eng.generate(PROMPTS[0], 24, speculative=False) == ref


def test_bad_arguments(pair):
    target, draft = pair
    counts = torch.tensor([5, 3, 0, 1])
    with pytest.raises(ValueError, match='k must be'): S.frequent_ids(counts, 0)
    with pytest.raises(ValueError, match='k must be'): S.frequent_ids(counts, 5)
    with pytest.raises(ValueError, match='force_ids'): S.frequent_ids(counts, 2, force_ids=[9])
    with pytest.raises(ValueError, match='counts must be'): S.frequent_ids(counts[None], 2)
    with pytest.raises(TypeError, match='str'): S.count_token_frequencies([[1, 2]], WordTok(['a']), progress=False)
    with pytest.raises(ValueError, match='outside vocab_size'):
        S.count_token_frequencies(['b'], WordTok(['a', 'b']), vocab_size=1, progress=False)
    with pytest.raises(ValueError, match='ids must'): S.DraftHead(target, [0, 1, 500])
    with pytest.raises(ValueError, match='repeat'): S.DraftHead(target, [3, 3])
    gen = lambda **kw: S.speculative_generate(target, draft, kw.pop('prompt', [1, 2]), kw.pop('n', 4), **kw)
    with pytest.raises(ValueError, match="method must be one of"): gen(method='beam')
    with pytest.raises(ValueError, match='gamma'): gen(method='chain', gamma=0)
    with pytest.raises(ValueError, match='tree_size'): gen(method='tree', depth=2, topk=2, tree_size=7)
    with pytest.raises(ValueError, match='temperature'): gen(temperature=-1)
    with pytest.raises(ValueError, match='prompt'): gen(prompt=[])
    with pytest.raises(ValueError, match='prompt ids'): gen(prompt=[1, 1000])
    with pytest.raises(ValueError, match='max_new_tokens'): gen(n=0)
    with pytest.raises(ValueError, match='subset'): gen(topk=4, vocab_ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r'draft_window must be None .* int >= 5'): gen(depth=4, draft_window=4)
    with pytest.raises(ValueError, match='draft_window'): gen(method='chain', gamma=3, draft_window=True)
    with pytest.raises(ValueError, match='draft_window'): S.FastSpec(target, draft, depth=4, draft_window=2.5)
    with pytest.raises(ValueError, match='no draft'): S.FastSpec(target, None, max_len=64).generate([1, 2], 4)
    with pytest.raises(ValueError, match='max_len'): S.FastSpec(target, draft, max_len=32).generate([1] * 20, 20)
    with pytest.raises(ValueError, match='parents'): S.tree_attention_mask([-1, 2, 0])
    with pytest.raises(ValueError, match='temperature'): S.target_probs(torch.zeros(4), 0)
    sparse = MiniCPM4ForCausalLM(tiny_cfg(sparse_config=dict(kernel_size=4, kernel_stride=2, block_size=4,
                                                             window_size=8, topk=4, dense_len=16)))
    with pytest.raises(ValueError, match='dense targets'): S.FastSpec(sparse, draft)


# ---------------------------------------------------------------- draft pieces
def test_draft_head_subset_rows_and_cache(pair):
    target, _ = pair
    ids = torch.tensor([5, 1, 70, 2])
    full, sub = S.DraftHead(target), S.DraftHead(target, ids)
    f = torch.randn(3, 64)
    torch.testing.assert_close(sub(f), full(f)[:, ids])
    assert full.weight() is target.lm_head.weight                         # the full head is never copied
    w = sub.weight()
    assert sub.weight() is w and w.shape == (4, 64)                        # gathered once, not per step
    with torch.no_grad(): target.lm_head.weight[5] += 1.0
    try:
        assert sub.weight() is not w and torch.equal(sub.weight()[0], target.lm_head.weight[5])
    finally:
        with torch.no_grad(): target.lm_head.weight[5] -= 1.0
    q = sub.full_probs(torch.randn(2, 4), 1.0)
    assert q.shape == (2, 96) and torch.allclose(q.sum(-1), torch.ones(2)) and float(q[:, 3].abs().max()) == 0


def test_tree_mask_and_compaction(pair):
    target, _ = pair
    m = S.tree_attention_mask([-1, 0, 0, 1])
    assert m.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    # a tree whose nodes form one chain in scrambled slots gives the same logits as the causal forward
    ids = torch.tensor([[1, 9, 4, 33, 8]])
    full = target(ids)
    cache = target.new_cache(1, 16)
    target(ids[:, :2], cache=cache)
    # slots: 0 -> token 4 (depth 1), 1 -> junk sibling 50 (depth 1), 2 -> 33 (depth 2), 3 -> 8 (depth 3)
    tree_ids = torch.tensor([[4, 50, 33, 8]])
    logits, _ = S.tree_forward(target, tree_ids, torch.tensor([2, 2, 3, 4]), S.tree_attention_mask([-1, -1, 0, 2]), cache)
    torch.testing.assert_close(logits[0, [0, 2, 3]], full[0, 2:], rtol=1e-4, atol=1e-4)
    S.compact_cache(cache, 2, [0, 2, 3])
    assert cache.length == 5
    nxt = target(torch.tensor([[7]]), cache=cache)
    torch.testing.assert_close(nxt[0, 0], target(torch.tensor([[1, 9, 4, 33, 8, 7]]))[0, -1], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- greedy: token-for-token identity
def test_greedy_identical_chain_and_tree(pair):
    target, draft = pair
    fr = S.frequent_ids(torch.arange(96, 0, -1), 48, force_ids=[2])
    accs = {}
    for p in PROMPTS:
        ref = target.generate(p, 30, stop_ids=[])[0]
        for method, vids in itertools.product(('chain', 'tree'), (None, fr)):
            st = S.SpecStats()
            out = S.speculative_generate(target, draft, p, 30, method=method, vocab_ids=vids, gamma=4, depth=4, topk=3,
                                         tree_size=10, stop_ids=[], stats=st)
            assert out == ref, (p, method, vids is not None)
            accs.setdefault((method, vids is None), []).append(st)
    # the trained draft is accepted often: the acceptance paths (not just rejections) were exercised
    tree = accs[('tree', True)]
    assert sum(s.mean_accept_length for s in tree) / len(tree) > 1.5, [s.as_dict() for s in tree]
    assert max(max(s.accepted) for s in tree) >= 3


def test_greedy_stops_at_eos(pair):
    target, draft = pair
    p = PROMPTS[1]
    ref = target.generate(p, 30, stop_ids=[])[0]
    stop = ref[7]
    want = ref[:ref.index(stop) + 1]
    for method in ('chain', 'tree'):
        assert S.speculative_generate(target, draft, p, 30, method=method, stop_ids=[stop]) == want


def test_fast_path_matches(pair):
    target, draft = pair
    fr = S.frequent_ids(torch.arange(96, 0, -1), 48, force_ids=[2])
    for method in ('chain', 'tree'):
        eng = S.FastSpec(target, draft, fr, method=method, gamma=4, depth=4, topk=3, tree_size=10, max_len=128)
        for p in PROMPTS[:3]:
            ref = target.generate(p, 30, stop_ids=[])[0]
            assert eng.generate(p, 30) == ref, (method, p)
            st = S.SpecStats()
            S.speculative_generate(target, draft, p, 30, method=method, vocab_ids=fr, gamma=4, depth=4, topk=3,
                                   tree_size=10, stop_ids=[], stats=st)
            # same algorithm -> same rounds (the last round may be cut differently at max_new_tokens)
            assert abs(eng.last_stats['rounds'] - st.rounds) <= 1
            assert eng.generate(p, 30, speculative=False) == ref



@pytest.mark.parametrize('kw', [dict(method='tree', depth=5, topk=4, tree_size=12), dict(method='chain', gamma=4),
                                dict(method='tree', depth=3, topk=6, tree_size=30)])
def test_lean_expand_equals_reference(pair, kw):
    """`_fast_expand` (carried masks, one concatenation) builds the same tree as `_fast_expand_ref`, bit for bit, from
    a random draft state; the draft cache past the committed length holds noise, so reading a slot the level did not
    write would show."""
    target, _ = pair
    torch.manual_seed(3)
    draft = S.EagleDraft(target.config).eval()                  # fresh random draft: no near-ties from training
    for vids in (None, torch.randperm(96)[:40].sort().values):
        e = S.FastSpec(target, draft, vids, max_len=96, **kw)
        e._prefill(torch.randint(4, 96, (11,)).tolist())
        with torch.no_grad():
            fr = S._fast_catchup(e)
            out = []
            for fn in (S._fast_expand, S._fast_expand_ref):
                kv, n = e.d.stack.kv, int(e.d_len)
                kv[:, n:] = torch.randn_like(kv[:, n:]) * 10
                out.append(fn(e, *fr))
        for x, y in zip(*out): assert torch.equal(x, y), (kw, vids is None)
        assert out[0][0].shape == (e.C + 1,) and int(out[0][1][-1]) == e.C



@pytest.mark.parametrize('kw', [dict(method='tree', depth=4, topk=3, tree_size=10), dict(method='chain', gamma=4)])
def test_draft_window_matches_reference(pair, kw):
    """A draft window of 8 positions on 36-token generations: FastSpec's windowed draft (its attention gathers the
    window's slots) drafts what `speculative_generate`'s windowed draft drafts (same rounds), the output is still the
    target's greedy text, and the window changes the drafting (rounds differ from the unwindowed run on some prompt)."""
    target, draft = pair
    fr = S.frequent_ids(torch.arange(96, 0, -1), 48, force_ids=[2])
    eng = S.FastSpec(target, draft, fr, max_len=128, draft_window=8, **kw)
    assert eng.d.wcols < eng.Ld                                      # the gathering path, not the full-buffer mask
    full = S.FastSpec(target, draft, fr, max_len=128, **kw)
    changed = 0
    for p in PROMPTS[:3]:
        ref = target.generate(p, 30, stop_ids=[])[0]
        assert eng.generate(p, 30) == ref
        st = S.SpecStats()
        S.speculative_generate(target, draft, p, 30, vocab_ids=fr, stop_ids=[], stats=st, draft_window=8, **kw)
        assert abs(eng.last_stats['rounds'] - st.rounds) <= 1, (kw, p)
        full.generate(p, 30)
        changed += full.last_stats['histogram'] != eng.last_stats['histogram']
    assert changed >= 1


def test_draft_window_reads_only_its_window(pair):
    """After a 40-token prefill, noise written into the draft's cache before the window leaves a windowed round's tree
    bit-identical (and the gathering path == the full-buffer mask path); without a window the same noise changes it."""
    target, _ = pair
    torch.manual_seed(5)
    draft = S.EagleDraft(target.config).eval()                     # random draft: its attention spreads over all keys
    prompt = torch.randint(4, 96, (40,), generator=torch.Generator().manual_seed(6)).tolist()
    trees = {}
    for name, W in (('window', 12), ('mask', 12), ('none', None)):
        e = S.FastSpec(target, draft, None, depth=4, topk=3, tree_size=10, max_len=96, draft_window=W)
        if name == 'mask': e.d.set_window(W, 10**6)                  # wcols >= Ld: the full mask with the window rule
        out = []
        for noise in (False, True):
            e._prefill(prompt)
            if noise:
                with torch.no_grad(): e.d.stack.kv[:, :40 - 12] = torch.randn_like(e.d.stack.kv[:, :40 - 12]) * 10
            with torch.no_grad(): out.append(S._fast_expand(e, *S._fast_catchup(e)))
        trees[name] = out
    for x, y in zip(*trees['window']): assert torch.equal(x, y)
    for x, y in zip(trees['window'][0], trees['mask'][0]): assert torch.equal(x, y)
    assert not all(torch.equal(x, y) for x, y in zip(*trees['none']))
    assert not all(torch.equal(x, y) for x, y in zip(trees['window'][0], trees['none'][0]))


def test_draft_prefill_writes_the_same_keys_and_values(pair):
    """The prefill's draft rows compute only their keys and values (`write_kv`): the same as the full layer writes
    (fresh random draft and features), and nothing else in the buffer changes."""
    target, _ = pair
    torch.manual_seed(7)
    draft = S.EagleDraft(target.config).eval()
    e = S.FastSpec(target, draft, None, depth=3, topk=2, tree_size=6, max_len=64)
    n, d = 21, e.d
    ids, feats = torch.randint(4, 96, (n,)), torch.randn(n, 64)
    pos = torch.arange(n)
    with torch.no_grad():
        d.stack.kv.normal_()
        ref = d.stack.kv.clone()
        d.forward(ids, feats, pos, pos, e.ar[None, :e.Ld] <= pos[:, None])
        full, d.stack.kv[:] = d.stack.kv.clone(), ref
        d.write_kv(ids, feats, pos)
    assert not torch.equal(full[:, :n], ref[:, :n])
    torch.testing.assert_close(d.stack.kv, full, rtol=1e-6, atol=1e-6)


def test_fallback_to_plain_steps(pair):
    """`fallback` after 6 rounds: a plain step timed as infinitely fast -> the rest of the output in plain steps; timed
    as infinitely slow -> rounds to the end; really timed (its state saved and restored) -> either way. The output is
    the target's greedy text in every case, and the stats say what happened."""
    target, draft = pair
    ref = target.generate(PROMPTS[0], 40, stop_ids=[])[0]
    e = S.FastSpec(target, draft, None, method='tree', depth=3, topk=3, tree_size=8, max_len=128)
    e.fallback_eager = True
    e._t_plain = 1e-9
    assert e.generate(PROMPTS[0], 40) == ref
    st = e.last_stats
    assert st['rounds'] == 6 and st['fallback']['at_token'] >= 7 and st['tokens'] == 40
    assert st['mean_accept_length'] == (st['fallback']['at_token'] - 1) / 6
    e._t_plain = 1e9
    assert e.generate(PROMPTS[0], 40) == ref
    assert e.last_stats['fallback']['at_token'] is None and e.last_stats['rounds'] > 6
    e._t_plain = None
    assert e.generate(PROMPTS[0], 40) == ref and e._t_plain > 0
    e.t.stack.split_decode = True          # the plain step's split-K decode (the CUDA default; its reference here)
    assert e.generate(PROMPTS[0], 40, speculative=False) == ref
    e.t.stack.split_decode = False
    e.fallback_eager = False                                    # the CPU default: no check at all
    assert e.generate(PROMPTS[0], 40) == ref and e.last_stats['fallback'] is None
    def broken(): raise RuntimeError('no plain step here')
    e.fallback_eager, e._t_plain, e._plain_seconds = True, None, broken    # a failed timing: speculate to the end
    assert e.generate(PROMPTS[0], 40) == ref and e.last_stats['fallback'] is None and e.fallback is None


def test_ancestors_by_squaring():
    "`_ancestors` (reachability by squaring) == walking each node's parent chain, on random trees of every depth."
    g = torch.Generator().manual_seed(0)
    for depth in range(1, 10):
        for _ in range(5):
            n = int(torch.randint(2, 40, (1,), generator=g))
            dep, P = [0], [0]
            for i in range(1, n):                             # parents first; a node's depth <= depth
                cand = [j for j in range(i) if dep[j] < depth]
                p = cand[int(torch.randint(len(cand), (1,), generator=g))]
                P.append(p); dep.append(dep[p] + 1)
            want = torch.zeros(n, n, dtype=torch.bool)
            for i in range(n):
                j = i
                while True:
                    want[i, j] = True
                    if j == 0: break
                    j = P[j]
            assert torch.equal(S._ancestors(torch.tensor(P), max(dep)), want), (depth, n)


def test_rows_attention_matches_attend(pair):
    """`_rows_attend` (each query row its own batch entry, keys broadcast) == `static_decode.attend` on fresh random
    inputs, with the stack's G-fold mask or its first rows only, over the whole buffer or a span; and FastSpec with it
    stays identical to greedy decoding."""
    from minicpm4_core.static_decode import attend
    torch.manual_seed(0)
    for T, Hq, Hkv, L, span in ((1, 4, 2, 40, None), (5, 16, 2, 64, 48), (9, 8, 8, 96, None)):
        q, kv = torch.randn(T, Hq, 16), torch.randn(L, 2 * Hkv, 16)
        allowed = torch.rand(T, span or L) < 0.6
        allowed[:, 0] = True
        m = torch.zeros(allowed.shape).masked_fill_(~allowed, float('-inf'))
        want = attend(q, kv, m.repeat(Hq // Hkv, 1)[None, None], span)
        for mask in (m.repeat(Hq // Hkv, 1)[None, None], m[None, None]):
            torch.testing.assert_close(S._rows_attend(q, kv, mask, span), want, rtol=1e-5, atol=1e-5)
    target, draft = pair
    old = S.FastSpec.row_attention
    try:
        S.FastSpec.row_attention = True
        e = S.FastSpec(target, draft, method='tree', depth=4, topk=3, tree_size=10, max_len=128)
        assert e.t.stack.attn is S._rows_attend and e.d.stack.attn is S._rows_attend
        for p in PROMPTS[:2]:
            assert e.generate(p, 30) == target.generate(p, 30, stop_ids=[])[0]
            assert e.generate(p, 30, speculative=False) == target.generate(p, 30, stop_ids=[])[0]
    finally:
        S.FastSpec.row_attention = old


def test_tune_picks_and_keeps_output(pair, monkeypatch):
    """`FastSpec._tune` (CUDA-only in use) run on the CPU with a fake timer that runs each candidate once: candidates this
    build cannot run are skipped, the fastest is installed (the target's and the draft's attention, the head's top-k),
    and the output stays greedy-exact with the picks (the rows layout, the sort top-k)."""
    import minicpm4_core.bench as B
    fast = {"rows/MATH", "'sort'", "(16, 256, 4, 3)", "(32, 128, 4, 3)"}   # the fake timer makes these the fastest

    def fake(fn, inner=None, reps=20):
        fn()                                                         # errors surface as on the GPU
        return 1.0 if repr(fn.__defaults__[0]) in fast else 5.0      # the candidate is the lambda's default
    monkeypatch.setattr(B, 'cuda_graph_time', fake)
    target, draft = pair
    e = S.FastSpec(target, draft, method='tree', depth=4, topk=3, tree_size=10, max_len=128)
    res = e._tune()
    assert res['verify_attention']['choice'] == res['draft_attention']['choice'] == 'rows/MATH'
    us = res['verify_attention']['us']
    assert 'stacked/default' in us and 'rows/default' in us and 'rows/CUDNN_ATTENTION' not in us   # no cuDNN on a CPU
    assert res['head_topk']['choice'] == "'sort'" and e.head_impl == 'sort'
    assert repr(e.t.stack.attn) == repr(e.d.stack.attn) == 'rows/MATH'
    picked = {k: res[f'verify_{k}']['choice'] for k in ('wqkv', 'wo', 'wgu', 'wdown')}
    # the tiny target: K = 64 fits no tile (cuBLAS only), down's K = 128 fits bk = 128: skinny_linear (interpreter)
    assert picked == dict(wqkv="'cublas'", wo="'cublas'", wgu="'cublas'", wdown='(32, 128, 4, 3)'), picked
    assert all(isinstance(p['wdown'], S._Skinny) and isinstance(p['wo'], torch.Tensor) for p in e._vlin)
    assert all(isinstance(p['wdown'], torch.Tensor) for p in e.t.stack.p)               # outside the verify: unchanged
    assert isinstance(e.d.fc, S._Skinny) and isinstance(e.d.stack.p[0]['wdown'], S._Skinny)   # the draft's K = 128 ones
    assert isinstance(e.d.stack.p[0]['wo'], torch.Tensor)
    for p in PROMPTS[:2]:
        assert e.generate(p, 24) == target.generate(p, 24, stop_ids=[])[0]


def test_tune_rejects_a_wrong_candidate(pair, monkeypatch):
    """A candidate whose output differs from the default kernel's on the same inputs is never timed or picked, even
    when it would be the fastest: the tuning lists it under 'rejected' and keeps cuBLAS."""
    import minicpm4_core.bench as B
    monkeypatch.setattr(B, 'cuda_graph_time', lambda fn, inner=None, reps=20: 5.0 if fn.__defaults__[0] == 'cublas' else 1.0)
    good = S.skinny_linear
    monkeypatch.setattr(S, 'skinny_linear', lambda x, w, *c: good(x, w, *c) * 1.01)    # 1% off: beyond fp32 rounding
    target, draft = pair
    e = S.FastSpec(target, draft, method='tree', depth=4, topk=3, tree_size=10, max_len=128)
    res = e._tune()
    assert res['verify_wdown']['choice'] == "'cublas'" and set(res['verify_wdown']['rejected']) == {'(32, 128, 4, 3)', '(64, 128, 4, 3)'}
    assert float(res['verify_wdown']['rejected']['(32, 128, 4, 3)']) == pytest.approx(0.01, rel=0.05)
    assert e._vlin is None or not any(isinstance(p['wdown'], S._Skinny) for p in e._vlin)
    assert 'rejected' not in res['verify_attention']                  # the attention candidates all agree
    assert S._tune_error(torch.ones(3), torch.tensor([1., float('nan'), 1.])) == float('inf')
    v = torch.randn(2, 5)                                             # an unsorted top-k: same values, any order
    assert S._tune_error((v, torch.zeros(2, 5, dtype=torch.long)), (v.flip(-1), torch.ones(2, 5, dtype=torch.long)),
                         order_free=True) == 0.0


def test_tune_leaves_the_default_only_for_a_clear_gain(pair, monkeypatch):
    "A candidate within `_TUNE_MARGIN` of the default kernel's time does not replace it (noise); a clearly faster one does."
    import minicpm4_core.bench as B
    target, draft = pair
    for skinny_us, want in ((4.9, "'cublas'"), (4.0, "(32, 128, 4, 3)")):       # cuBLAS 5.0: 2% vs 20% faster
        monkeypatch.setattr(B, 'cuda_graph_time', lambda fn, inner=None, reps=20, s=skinny_us:
                            5.0 if fn.__defaults__[0] == 'cublas' else s if fn.__defaults__[0] == (32, 128, 4, 3) else 9.0)
        res = S.FastSpec(target, draft, method='tree', depth=4, topk=3, tree_size=10, max_len=128)._tune()
        assert res['verify_wdown']['choice'] == want, (skinny_us, res['verify_wdown'])


def test_queued_rounds_same_output_fewer_reads(pair):
    "Queuing the surely-needed rounds before each host read changes nothing but the number of reads."
    target, draft = pair
    e = S.FastSpec(target, draft, method='tree', depth=4, topk=3, tree_size=10, max_len=128)
    for p in PROMPTS[:3]:
        got = {}
        for q in (False, True):
            e.queue_rounds = q
            got[q] = (e.generate(p, 40), dict(e.last_stats))
        (o0, s0), (o1, s1) = got[False], got[True]
        assert o0 == o1 and s0['rounds'] == s1['rounds'] and s0['histogram'] == s1['histogram']
        assert s0['host_reads'] == s0['rounds'] + 1 and s1['host_reads'] < s0['host_reads']
        assert s1['path'] == 'eager' and s1['prefill_s'] >= 0


def test_head_topk_logprobs():
    "Top-k of the head: log-probs equal log_softmax's, one- and two-stage (long rows), and the chain's argmax."
    torch.manual_seed(0)
    for n, k in ((300, 5), (9000, 8)):
        x = torch.randn(3, n) * 3
        v, i = S._head_topk(x, k)
        ref = x.log_softmax(-1).topk(k)
        assert torch.equal(i, ref.indices) and torch.allclose(v, ref.values, atol=1e-6)
        v, i = S._head_topk(x, k, logprobs=False)
        assert torch.equal(i, x.topk(k).indices) and torch.allclose(v, x.topk(k).values)
    v, i = S._head_topk(x, 1)
    assert torch.equal(i[:, 0], x.argmax(-1)) and torch.allclose(v[:, 0], x.log_softmax(-1).max(-1).values, atol=1e-5)


def test_subclass_hooks(pair):
    "The hooks a subclass overrides (`_make_target`, `_verify_forward`, `_after_commit`) are called, with their shapes."
    target, draft = pair
    seen = []

    class Hooked(S.FastSpec):
        def _make_target(self, target, max_len):
            seen.append('target'); return super()._make_target(target, max_len)

        def _verify_forward(self, tok, m, dep, anc):
            assert tok.shape == dep.shape == (self.N + 1,) and m.shape == (1,) and anc.shape == (self.N + 1,) * 2
            seen.append('verify'); return super()._verify_forward(tok, m, dep, anc)

        def _after_commit(self, m, pidx, a):
            assert pidx.shape == (self.D + 2,) and a.shape == (1,); seen.append('commit')

    e = Hooked(target, draft, method='tree', depth=3, topk=3, tree_size=8, max_len=64)
    assert e.generate(PROMPTS[0], 12) == target.generate(PROMPTS[0], 12, stop_ids=[])[0]
    r = e.last_stats['rounds']
    assert seen == ['target'] + ['verify', 'commit'] * r

def test_infllmv2_target(pair):
    dense, draft = pair
    sc = dict(kernel_size=4, kernel_stride=2, block_size=4, window_size=8, topk=4, dense_len=16)
    sparse = MiniCPM4ForCausalLM(tiny_cfg(sparse_config=sc)).eval()
    sparse.load_state_dict(dense.state_dict())
    p = PROMPTS[0] + dense.generate(PROMPTS[0], 12, stop_ids=[])[0]                   # 18 > dense_len: sparse
    ref = sparse.generate(p, 20, stop_ids=[])[0]
    assert ref != dense.generate(p, 20, stop_ids=[])[0]                               # sparse attention is in play
    st = S.SpecStats()
    assert S.speculative_generate(sparse, draft, p, 20, method='chain', gamma=3, stop_ids=[], stats=st) == ref
    assert st.mean_accept_length > 1.0
    for sc2 in (sc, dict(sc, use_nope=True, lse_approx=True)):       # tree verification past dense_len: node-exact
        sp = MiniCPM4ForCausalLM(tiny_cfg(sparse_config=sc2)).eval()
        sp.load_state_dict(dense.state_dict())
        ref2 = sp.generate(p, 20, stop_ids=[])[0]
        st = S.SpecStats()
        assert S.speculative_generate(sp, draft, p, 20, method='tree', topk=3, tree_size=10, stop_ids=[], stats=st) == ref2
        assert st.mean_accept_length > 1.0 and max(st.drafted) > max(st.accepted) + 1   # branches were verified
    short = MiniCPM4ForCausalLM(tiny_cfg(sparse_config=dict(sc, dense_len=64))).eval()
    short.load_state_dict(dense.state_dict())
    ref = short.generate(p[:6], 16, stop_ids=[])[0]
    assert S.speculative_generate(short, draft, p[:6], 16, method='tree', topk=3, tree_size=10, stop_ids=[]) == ref


# ---------------------------------------------------------------- sampling: the distribution is the target's
def chi2_pvalue(counts, probs, min_expected=5.0):
    "Pearson chi-square goodness of fit; cells with expected < min_expected are pooled."
    n = counts.sum()
    exp = probs.double() * n
    big = exp >= min_expected
    obs = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    ex = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = ex > 0
    obs, ex = obs[keep], ex[keep]
    stat = float(((obs - ex) ** 2 / ex).sum())
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def wrong_accept_children(p, q, candidates, generator=None):
    "Same as S.accept_children but resamples from p instead of the residual norm(max(0, p - q)): biased."
    p, q = p.double().clone(), q.double().clone()
    for i, c in enumerate(candidates):
        if float(torch.rand((), generator=generator, dtype=torch.float64)) < min(1.0, float(p[c]) / float(q[c])):
            return i, p
        q[c] = 0
        q = q / q.sum()
    return None, p


def node_draws(p, q, n_cand, n, gen, rule):
    out = torch.zeros(p.numel(), dtype=torch.long)
    for _ in range(n):
        keys = q.log() - torch.log(-torch.log(torch.rand(q.shape, generator=gen).clamp(1e-12, 1 - 1e-7)))
        cands = keys.topk(n_cand).indices.tolist()
        i, r = rule(p, q, cands, gen)
        out[cands[i] if i is not None else int(torch.multinomial(r.float(), 1, generator=gen))] += 1
    return out


def test_accept_rule_single_node():
    p = torch.tensor([.10, .40, .05, .30, .15])
    q = torch.tensor([.50, .10, .20, 1e-30, .20])            # ~0 on id 3, as outside an FR-Spec subset
    q = q / q.sum()
    gen = torch.Generator().manual_seed(0)
    for n_cand in (1, 2, 3):
        assert chi2_pvalue(node_draws(p, q, n_cand, 2500, gen, S.accept_children), p) > 1e-3
    assert chi2_pvalue(node_draws(p, q, 2, 2500, gen, wrong_accept_children), p) < 1e-6


@pytest.fixture(scope='module')
def small_vocab(one_thread):
    "V = 6: a target with spread-out distributions and an untrained draft that disagrees with it."
    torch.manual_seed(3)
    cfg = tiny_cfg(vocab_size=6, hidden_size=32, num_hidden_layers=1, intermediate_size=64, initializer_range=0.08)
    target = MiniCPM4ForCausalLM(cfg).eval()
    draft = S.EagleDraft(cfg)
    torch.manual_seed(4)
    for n, p in draft.named_parameters():
        if not n.endswith('norm.weight'): torch.nn.init.normal_(p, std=0.6)
    prompt = [1, 4]
    # exact target distribution of (x1, x2, x3) by enumeration; we test the pair (x2, x3)
    seqs = torch.tensor([prompt + list(s) for s in itertools.product(range(6), repeat=3)])
    with torch.no_grad():
        lp = target(seqs[:, :-1]).float().log_softmax(-1)
    n0 = len(prompt)
    joint = sum(lp[:, n0 - 1 + j].gather(-1, seqs[:, n0 + j, None])[:, 0] for j in range(3)).exp()
    pair_p = joint.view(6, 36).sum(0)
    return target, draft.eval(), prompt, pair_p


def spec_pair_counts(target, draft, prompt, n, **kw):
    gen = torch.Generator().manual_seed(kw.pop('seed', 0))
    counts = torch.zeros(36, dtype=torch.long)
    for _ in range(n):
        out = S.speculative_generate(target, draft, prompt, 3, temperature=1.0, stop_ids=[], generator=gen, **kw)
        counts[out[1] * 6 + out[2]] += 1
    return counts


def test_sampling_distribution_chi_square(small_vocab, monkeypatch):
    target, draft, prompt, pair_p = small_vocab
    tree = dict(method='tree', depth=2, topk=3, tree_size=6, vocab_ids=[0, 1, 3, 4, 5])   # id 2 never drafted
    assert chi2_pvalue(spec_pair_counts(target, draft, prompt, 600, **tree), pair_p) > 1e-3
    chain = dict(method='chain', gamma=2)
    assert chi2_pvalue(spec_pair_counts(target, draft, prompt, 400, seed=1, **chain), pair_p) > 1e-3
    monkeypatch.setattr(S, 'accept_children', wrong_accept_children)
    assert chi2_pvalue(spec_pair_counts(target, draft, prompt, 400, seed=2, **tree), pair_p) < 1e-5


def test_sampling_distribution_sparse_tree(one_thread):
    "Tree verification of an InfLLM v2 target past dense_len keeps the target's law (its own cached decoding)."
    torch.manual_seed(5)
    sc = dict(kernel_size=4, kernel_stride=2, block_size=4, window_size=4, topk=1, dense_len=8)
    cfg = tiny_cfg(vocab_size=6, hidden_size=32, num_hidden_layers=1, intermediate_size=64, initializer_range=0.08,
                   sparse_config=sc)
    target = MiniCPM4ForCausalLM(cfg).eval()
    draft = S.EagleDraft(cfg)
    for n, p in draft.named_parameters():
        if not n.endswith('norm.weight'): torch.nn.init.normal_(p, std=0.6)
    draft.eval()
    prompt = torch.randint(0, 6, (14,), generator=torch.Generator().manual_seed(6)).tolist()   # 14 > dense_len: sparse
    seqs = torch.tensor(list(itertools.product(range(6), repeat=2)))                         # (x1, x2)
    with torch.no_grad():                                   # the law by the model's own cached decoding, 36 rows at once
        cache = target.new_cache(36, 17)
        l0 = target(torch.tensor([prompt] * 36), cache=cache)[:, -1].log_softmax(-1)
        l1 = target(seqs[:, :1], cache=cache)[:, -1].log_softmax(-1)
        l2 = target(seqs[:, 1:], cache=cache)[:, -1].log_softmax(-1)
    joint = (l0.gather(-1, seqs[:, :1]) + l1.gather(-1, seqs[:, 1:]))[:, 0, None] + l2          # (x1, x2, x3)
    pair_p = joint.exp().view(6, 6, 6).sum(0).flatten()                                          # (x2, x3)
    tree = dict(method='tree', depth=2, topk=3, tree_size=6)
    assert chi2_pvalue(spec_pair_counts(target, draft, prompt, 400, **tree), pair_p) > 1e-3


# ---------------------------------------------------------------- CUDA-graph safety, checked on the CPU
def test_fast_round_is_graph_capturable(pair):
    """A captured CUDA graph cannot read a value back to the host (.item(), 0-dim tensor indexing) nor copy a freshly
    made CPU tensor to the device (`x[i] = 3`). Record the ops of one round / one plain step and forbid both."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__(); self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    target, draft = pair
    forbidden = ('aten.lift_fresh', 'aten._local_scalar_dense', 'aten.nonzero', 'aten.item')
    for method in ('chain', 'tree'):
        eng = S.FastSpec(target, draft, method=method, gamma=3, depth=3, topk=3, tree_size=8, max_len=64)
        eng._prefill(PROMPTS[0])
        for fn in (eng._round, eng._plain_step):
            with Record() as r: fn()
            bad = sorted({o for o in r.ops if o.startswith(forbidden)})
            assert not bad, (method, fn.__name__, bad)
    with Record() as r:                                  # the recorder does see the pattern it must forbid
        torch.zeros(3, dtype=torch.long)[1] = 5
    assert any(o.startswith('aten.lift_fresh') for o in r.ops)
