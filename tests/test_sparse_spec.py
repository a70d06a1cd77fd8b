"""minicpm4_core.sparse_spec: FR-Spec tree verification over an InfLLM v2 target past dense_len with static shapes.
Each node's logits equal the model's own tree verification (`frspec.tree_forward`, the per-node loop), greedy output
equals the model's own loop and the engine's plain path, packed targets too, bad arguments refused (fp32, CPU, fresh
random weights and ids)."""
import pytest
import torch

from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.engine import EagerSpec, Engine
from minicpm4_core.frspec import EagleDraft, tree_attention_mask, tree_forward
from minicpm4_core.model import MiniCPM4ForCausalLM
from minicpm4_core import sparse_spec as SS
from minicpm4_core.sparse_spec import SparseFastSpec, prefill_hidden

pytestmark = [pytest.mark.usefixtures('one_thread'),     # tests/conftest.py
              pytest.mark.filterwarnings('ignore:.*using the torch reference')]
TINY = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, initializer_range=0.3, torch_dtype='float32', eos_token_id=2)
# kernels of 8 keys every 4 (depth <= 3), blocks of 8, window 2 blocks, top-3: a node is sparse from 63 keys on
SP = dict(kernel_size=8, kernel_stride=4, block_size=8, window_size=16, topk=3, dense_len=63)


def model_of(seed, sparse=SP, **kw):
    torch.manual_seed(seed)
    return MiniCPM4ForCausalLM(MiniCPM4Config.tiny(**{**TINY, **kw}, sparse_config=sparse)).eval()


def random_tree(N, D, g):
    "parents (N+1,) parents first (root -1), depths (N+1,) <= D."
    par, dep = [-1], [0]
    for i in range(1, N + 1):
        cands = [j for j in range(i) if dep[j] < D]
        j = cands[int(torch.randint(0, len(cands), (1,), generator=g))]
        par.append(j); dep.append(dep[j] + 1)
    return par, torch.tensor(dep)


def check_verify(e, model, m: int, g) -> None:
    """A fresh random prompt of m tokens and a random tree at its end: every node's verify logits and hidden states ==
    `tree_forward`'s on a cache filled by the model's chunked prefill."""
    prompt = torch.randint(0, 97, (m,), generator=g)
    e._prefill(prompt.tolist())
    par, dep = random_tree(e.N, e.D, g)
    tok, mask = torch.randint(0, 97, (e.N + 1,), generator=g), tree_attention_mask(par)
    with torch.no_grad():
        logits, hid = e._verify_forward(tok, torch.tensor([m]), dep, mask)
        cache = model.new_cache(1, m + e.N + 1)
        prefill_hidden(model, prompt, cache, 16)
        ref, ref_h = tree_forward(model, tok[None], m + dep, mask, cache)
    torch.testing.assert_close(logits, ref[0], rtol=1e-4, atol=1e-4, msg=f"root {m}")
    torch.testing.assert_close(hid, ref_h[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('select', ['masks-split', 'masks', 'lists'])
@pytest.mark.parametrize('kw', [dict(), dict(use_nope=True), dict(selection='minicpm4.1', topk=5),
                                dict(init_blocks=2, kernel_size=12, topk=4), dict(window_size=8, topk=2)],
                         ids=['minicpm4', 'use_nope', 'minicpm4.1', 'init2-p12', 'window1'])
def test_verify_equals_tree_forward(kw, select, monkeypatch):
    """Random trees (depth <= 3, 7 nodes) at roots on both sides of dense_len, paths completing a kernel or not: every
    node's logits == tree_forward's on a cache filled by the same chunked prefill; both per-layer selection paths."""
    monkeypatch.setattr(SS, 'TREE_SELECT', select.split('-')[0])
    monkeypatch.setattr(SS, 'ATTN_CHUNK', 24 if select == 'masks-split' else None)   # 128 slots -> 144: 6 chunks
    model = model_of(11, dict(SP, **kw))
    e = SparseFastSpec(model, EagleDraft(model.config).eval(), None, depth=3, topk=2, tree_size=6, max_len=128, chunk=16)
    g = torch.Generator().manual_seed(12)
    dense_and_sparse, kernels_in_paths = 0, 0
    for m in (50, 60, 61, 62, 63, 64, 77, 90):
        check_verify(e, model, m, g)
        dense_and_sparse += bool(e._dense.any() and not e._dense.all())
        kernels_in_paths += int(e._g['new'].sum())
    assert dense_and_sparse >= 1 and kernels_in_paths >= 5        # both regimes in one tree; path kernels exercised


@pytest.mark.parametrize('kw,init', [(dict(), 0.3), (dict(use_nope=True), 0.6)], ids=['keys', 'use_nope'])
def test_greedy_equals_model_generate(kw, init, monkeypatch):
    """Prompts below and past dense_len, rounds that accept several tokens (the draft's subset holds the target's
    tokens): the rollback, the ring and the compressed-key update each round; == the model's own greedy loop, and the
    static state (K/V, kc, ring) == the model's cache. (use_nope: a target whose greedy text does not repeat one token:
    the static path undoes RoPE to get a generated token's pre-RoPE key, equal up to rounding, so the exact ties that
    eight identical tokens make between kernels in the first layer may break the other way.)"""
    monkeypatch.setattr(SS, 'ATTN_CHUNK', 32)                        # the split attention: 128 slots, 4 chunks
    model = model_of(1, dict(SP, **kw), initializer_range=init)
    draft = EagleDraft(model.config).eval()
    g = torch.Generator().manual_seed(3)
    accepted = 0
    for n in (40, 70):
        prompt = torch.randint(3, 97, (n,), generator=g).tolist()
        ref = model.generate([prompt], 40, stop_ids=[], fast=False)[0]
        e = SparseFastSpec(model, draft, torch.tensor(sorted(set(ref) | {5, 7, 11})), depth=3, topk=2, tree_size=6,
                           max_len=128)
        assert e.generate(prompt, 40) == ref
        st = e.last_stats
        assert st['tokens'] >= 40 and st['path'] == 'eager' and sum(st['histogram']) == st['rounds']
        accepted += sum(st['histogram'][1:])
        check_state(e, model, prompt)
    assert accepted >= 3                                             # rounds that kept drafted tokens


def check_state(e, model, prompt):
    "After generate: K/V, compressed keys and the pre-RoPE ring == the model's cache fed the committed tokens one by one."
    from minicpm4_core.infllmv2 import compress_keys
    L, n, sd, st = int(e.t_len), len(prompt), e.sd, e.sd.st
    full = prompt + e.out_buf[:L - n].tolist()
    cache = model.new_cache(1, L)
    with torch.no_grad():
        model(torch.tensor([full[:n]]), cache=cache)
        for t in range(n, L): model(torch.tensor([[full[t]]]), cache=cache)
    for l, lc in enumerate(cache.layers):
        torch.testing.assert_close(sd.base.stack.kv[l, :L, :sd.Hkv], lc.k[0, :L], rtol=1e-4, atol=1e-4)
        keys = lc.state['infllmv2_k_nope'][0, :L] if sd.ring is not None else lc.k[0, :L]
        kc = compress_keys(keys[None], st.kernel_size, st.kernel_stride)[0]
        torch.testing.assert_close(sd.kc[l, 0, :kc.shape[0]], kc, rtol=1e-4, atol=1e-4)
        if sd.ring is not None:
            t = torch.arange(L - sd.R, L)
            torch.testing.assert_close(sd.ring[l, t % sd.R], keys[t], rtol=1e-4, atol=1e-4)


def test_plain_steps_and_fallback_past_dense_len():
    """speculative=False, and a `fallback` after 6 rounds, decode through the StaticSparseDecoder over the rounds'
    buffers: == the model's greedy loop, and the static state (K/V, kc, ring) == the model's cache afterwards."""
    model = model_of(1, dict(SP, use_nope=True), initializer_range=0.6)
    draft = EagleDraft(model.config).eval()
    prompt = torch.randint(3, 97, (70,), generator=torch.Generator().manual_seed(9)).tolist()
    ref = model.generate([prompt], 40, stop_ids=[], fast=False)[0]
    e = SparseFastSpec(model, draft, torch.tensor(sorted(set(ref) | {5, 7, 11})), depth=3, topk=2, tree_size=6,
                       max_len=128)
    assert e.generate(prompt, 40, speculative=False) == ref and e.last_stats['rounds'] == 0
    check_state(e, model, prompt)
    e.fallback_eager, e._t_plain = True, 1e-9
    assert e.generate(prompt, 40) == ref
    assert e.last_stats['rounds'] == 6 and e.last_stats['fallback']['at_token'] >= 7
    check_state(e, model, prompt)
    e._t_plain = None                                           # really timed: state restored, output unchanged
    assert e.generate(prompt, 40) == ref and e._t_plain > 0
    check_state(e, model, prompt)


def test_chunked_prefill_equals_engine_plain_path():
    "Prefill in chunks of 16 (the model decides dense / sparse per chunk): spec == the engine's plain path, same chunk."
    model = model_of(5)
    draft = EagleDraft(model.config).eval()
    prompt = torch.randint(3, 97, (75,), generator=torch.Generator().manual_seed(6)).tolist()
    plain = Engine(model, 128, chunk=16).generate([prompt], 24, stop_ids=[])[0]
    e = SparseFastSpec(model, draft, torch.tensor(sorted(set(plain) | {5, 7})), depth=3, topk=2, tree_size=6,
                       max_len=128, chunk=16)
    assert e.generate(prompt, 24) == plain
    assert e.last_timing['prefill_s'] > 0 and e.last_timing['setup_s'] >= 0


@pytest.mark.parametrize('quant', [None, 'w4a16', 'ternary'])
def test_engine_sparse_spec_equals_model_generate(quant, torch_kernels):
    "Engine(spec=...) over an InfLLM v2 target past dense_len takes SparseFastSpec; greedy == model.generate, packed or not."
    model = model_of(7)
    torch.manual_seed(7)
    draft = EagleDraft(model.config).eval()
    prompt = torch.randint(3, 97, (66,), generator=torch.Generator().manual_seed(8)).tolist()
    eng = Engine(model, 128, quant=quant, spec=(draft, None), spec_kw=dict(depth=3, topk=3, tree_size=8))
    assert isinstance(eng.spec, SparseFastSpec) and eng.quant == quant
    ref = model.generate([prompt], 20, stop_ids=[], fast=False)[0]     # the (packed) model's own loop
    assert eng.generate([prompt], 20, stop_ids=[]) == [ref]
    assert eng.spec_stats['tokens'] >= 20 and eng.spec_stats['path'] == 'eager'
    t = eng.last_timing
    assert t['backend'] == 'spec' and t['ttft_s'] > 0 and t['decode_s'] > 0 and t['prompt_len'] == 66
    sd = eng.spec.sd                                                  # the spec's static buffers are counted
    assert eng.memory()['spec'] >= (sd.base.stack.kv.numel() + sd.kc.numel() + eng.spec.d.stack.kv.numel()) * 4


def test_bad_arguments_and_fallback(capsys):
    model = model_of(9)
    draft = EagleDraft(model.config).eval()
    with pytest.raises(ValueError, match='depth=4: a path of depth \\+ 1 = 5 tokens'):
        SparseFastSpec(model, draft, depth=4, max_len=128)
    with pytest.raises(ValueError, match='use depth <= 3 \\(or gamma for chains\\)'):
        SparseFastSpec(model, draft, method='chain', gamma=5, max_len=128)
    with pytest.raises(ValueError, match='lse_approx=True is not supported'):
        SparseFastSpec(model_of(9, dict(SP, lse_approx=True)), draft, depth=3, max_len=128)
    with pytest.raises(ValueError, match='no sparse_config'):
        SparseFastSpec(model_of(9, None), draft, depth=3, max_len=128)
    with pytest.raises(ValueError, match='needs a draft'):
        SparseFastSpec(model, None, depth=3, max_len=128)
    with pytest.raises(ValueError, match='chunk must be an int >= 1'):
        SparseFastSpec(model, draft, depth=3, max_len=128, chunk=0)
    e = SparseFastSpec(model, draft, depth=3, tree_size=8, max_len=128)
    with pytest.raises(ValueError, match='run through its StaticSparseDecoder'): e._plain_step()
    with pytest.raises(ValueError, match='tree needs .* cache slots > max_len=128'):
        e.generate([5] * 70, 50)
    # the engine falls back to the model's own (eager) tree verification where SparseFastSpec refuses, and says why
    eng = Engine(model, 128, spec=(draft, None), spec_kw=dict(depth=5, topk=2, tree_size=6))
    assert isinstance(eng.spec, EagerSpec) and 'depth=5: a path of depth + 1 = 6 tokens' in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"spec_kw: unknown \['chunk'\]"):
        Engine(model, 128, spec=(draft, None), spec_kw=dict(chunk=4))


def test_draft_window_past_dense_len():
    """spec_kw draft_window reaches both spec paths of an engine past dense_len - SparseFastSpec (its draft gathers 8
    positions + the round's slots) and EagerSpec (the model's own verification) - and the output stays the model's."""
    model = model_of(4)
    draft = EagleDraft(model.config).eval()
    prompt = torch.randint(3, 97, (70,), generator=torch.Generator().manual_seed(8)).tolist()
    ref = model.generate([prompt], 20, stop_ids=[], fast=False)[0]
    ids = torch.tensor(sorted(set(ref) | {5, 7}))
    fast = Engine(model, 128, spec=(draft, ids), spec_kw=dict(depth=3, topk=2, tree_size=6, draft_window=8))
    assert isinstance(fast.spec, SparseFastSpec) and fast.spec.d.wcols < fast.spec.Ld
    eager = Engine(model, 128, spec=(draft, ids), spec_kw=dict(depth=5, topk=2, tree_size=6, draft_window=8))
    assert isinstance(eager.spec, EagerSpec)
    for e in (fast, eager): assert e.generate([prompt], 20, stop_ids=[])[0] == ref
    with pytest.raises(ValueError, match='draft_window must be'):
        Engine(model, 128, spec=(draft, ids), spec_kw=dict(depth=3, topk=2, tree_size=6, draft_window=3))


@pytest.mark.parametrize('L,chunk', [(96, 32), (100, 32), (20, 32)], ids=['chunks', 'chunks+rest', 'rest-only'])
def test_split_attention_equals_one_sdpa(L, chunk):
    """The split attentions (chunks as batch entries + LSE combine) == one masked SDPA (`static_decode.attend`) on fresh
    random q / K / V and masks with fully masked chunks and rows that see a single slot."""
    from minicpm4_core.static_decode import attend
    g = torch.Generator().manual_seed(L)
    T, Hq, Hkv, Dh = 5, 8, 2, 16
    q, kv = torch.randn(T, Hq, Dh, generator=g), torch.randn(L, 2 * Hkv, Dh, generator=g)
    ok = torch.rand(Hkv, T, L, generator=g) < 0.3
    ok[:, :, 32:64] = False                                        # a chunk nobody sees
    ok[:, 0] = False; ok[:, 0, L - 1] = True                       # a row that sees one slot
    G = Hq // Hkv
    mask = torch.zeros(1, Hkv, G * T, L).masked_fill_(~ok[:, None].expand(Hkv, G, T, L).reshape(1, Hkv, G * T, L),
                                                      float('-inf'))
    want = SS.masked_tree_attention(q, kv, ok)
    torch.testing.assert_close(SS.split_attend(q, kv, mask, chunk), want, rtol=1e-5, atol=1e-5)
    if L % chunk == 0:
        for grouped in (False, True):
            SS.ATTN_GROUPED = grouped
            try: torch.testing.assert_close(SS.split_tree_attention(q, kv, ok, chunk), want, rtol=1e-5, atol=1e-5)
            finally: SS.ATTN_GROUPED = False
    shared = mask[:, :1]                                           # the draft's mask: one for every kv head
    torch.testing.assert_close(SS.split_attend(q, kv, shared, chunk), attend(q, kv, shared), rtol=1e-5, atol=1e-5)


def test_split_paths_change_nothing(monkeypatch):
    "The split attentions (verify and draft) against one SDPA each: the same tokens, the same acceptance per round."
    model = model_of(1)
    draft = EagleDraft(model.config).eval()
    prompt = torch.randint(3, 97, (70,), generator=torch.Generator().manual_seed(4)).tolist()
    vocab = torch.tensor(sorted(set(model.generate([prompt], 30, stop_ids=[], fast=False)[0]) | {5, 7, 11}))
    runs = []
    for chunk in (None, 32, 48):
        monkeypatch.setattr(SS, 'ATTN_CHUNK', chunk)
        e = SparseFastSpec(model, draft, vocab, depth=3, topk=2, tree_size=6, max_len=128)
        assert e.sd.max_len == (128 if chunk in (None, 32) else 144)
        runs.append((e.generate(prompt, 30), e.last_stats['histogram']))
    assert runs[0] == runs[1] == runs[2] and sum(runs[0][1][1:]) > 0


# ---- the verify's attention as one Triton kernel (tree_sparse_attention; the interpreter on the CPU, tests/conftest.py)

def tree_case(T, G, Hkv, Dh, bs, m, Lt, seed, path_only=(), empty_chunk=None):
    """Fresh random q / K / V, a random tree, random block bitmaps (~30%, each node's own block in: the window); nodes in
    path_only select no prefix block; empty_chunk (lo, hi): slots nobody selects. K/V rows at slots no node of that kv
    head may attend are NaN in kv_nan (a kernel that reads them into its sums gives NaN). -> a dict of the inputs, the
    slot mask written out by loops, and kv_nan."""
    g = torch.Generator().manual_seed(seed)
    q, kv = torch.randn(T, G * Hkv, Dh, generator=g), torch.randn(Lt, 2 * Hkv, Dh, generator=g)
    par, dep = random_tree(T - 1, 3, g)
    anc = tree_attention_mask(par)
    nb = -(-Lt // bs)
    tblk = ((m + dep) // bs).clamp(max=nb - 1)
    bsel = torch.rand(Hkv, T, nb, generator=g) < 0.3
    for i in path_only: bsel[:, i, :m // bs + 1] = False
    if empty_chunk: bsel[:, :, empty_chunk[0] // bs:-(-empty_chunk[1] // bs)] = False
    bsel[:, torch.arange(T), tblk] = True
    ok = torch.zeros(Hkv, T, Lt, dtype=torch.bool)
    for h in range(Hkv):
        for i in range(T):
            for j in range(Lt):
                if j < m: ok[h, i, j] = bool(bsel[h, i, j // bs])
                elif j < m + T: ok[h, i, j] = bool(anc[i, j - m]) and bool(bsel[h, i, tblk[j - m]])
    kv_nan = kv.clone()
    for h in range(Hkv):
        unseen = ~ok[h].any(0)
        kv_nan[unseen, h] = float('nan'); kv_nan[unseen, Hkv + h] = float('nan')
    return dict(q=q, kv=kv, bsel=bsel, anc=anc, tblk=tblk, m=torch.tensor([m]), ok=ok, kv_nan=kv_nan)


@pytest.mark.parametrize('T,G,Hkv,Dh,bs,m,Lt,cfg,extra', [
    (9, 2, 2, 16, 8, 50, 128, dict(BN=16, CH=32), dict(path_only=(3, 4), empty_chunk=(40, 48))),   # 2 blocks a tile,
                                                                                     # one unseen; m % CH != 0
    (9, 4, 2, 32, 16, 77, 160, dict(BN=16, CH=32), dict(empty_chunk=(32, 64))),      # a tile is one block; a dead chunk
    (9, 4, 2, 32, 16, 77, 160, dict(BN=16, CH=32, BRANCH=False), dict(empty_chunk=(0, 48))),   # masked-off tiles
    (17, 3, 1, 16, 32, 96, 150, dict(BN=16, CH=48, RT=16), dict(path_only=(0, 16))),   # G=3 padded, Lt % CH != 0, 4 row
                                                                                     # tiles; m % bs == 0: 2 rows see
                                                                                     # their path only
    (5, 8, 1, 64, 64, 60, 130, dict(), dict()),                                       # the defaults: one chunk, a 64-key block
], ids=['bs<BN', 'bs=BN', 'mask-mode', 'G3-ragged', 'defaults'])
def test_tree_sparse_attention_equals_masked_sdpa(T, G, Hkv, Dh, bs, m, Lt, cfg, extra):
    """The kernel == one masked SDPA (`masked_tree_attention`) on the slot mask written out by loops (== `tree_slots_ok`);
    K/V that no node of a kv head may see are NaN, so the kernel must not fold them into its sums (skipped chunks, tiles,
    columns); rows that see only their path; chunks nobody selects."""
    c = tree_case(T, G, Hkv, Dh, bs, m, Lt, seed=T * Lt, **extra)
    assert torch.equal(SS.tree_slots_ok(c['bsel'], c['anc'], c['tblk'], c['m'], Lt, bs), c['ok'])
    want = SS.masked_tree_attention(c['q'], c['kv'], c['ok'])
    got = SS.tree_sparse_attention(c['q'], c['kv_nan'], c['bsel'], c['anc'], c['tblk'], c['m'], block_size=bs, config=cfg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ref = SS.tree_sparse_attention(c['q'], c['kv'], c['bsel'], c['anc'], c['tblk'], c['m'], block_size=bs, backend='torch')
    torch.testing.assert_close(ref, want, rtol=0, atol=0)                      # the CPU fallback is the definition
    if extra.get('path_only') and m % bs == 0:
        assert not c['ok'][:, list(extra['path_only']), :m].any()                # those rows: no prefix slot at all


def test_tree_sparse_attention_bf16_and_bad_arguments():
    "bf16 inputs (the dots upcast in the interpreter) within bf16 rounding of the fp32 result; shapes refused clearly."
    c = tree_case(7, 4, 2, 32, 16, 40, 96, seed=5)
    want = SS.masked_tree_attention(c['q'], c['kv'], c['ok'])
    got = SS.tree_sparse_attention(c['q'].bfloat16(), c['kv'].bfloat16(), c['bsel'], c['anc'], c['tblk'], c['m'],
                                   block_size=16, config=dict(BN=16, CH=32))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
    args = (c['q'], c['kv'], c['bsel'], c['anc'], c['tblk'], c['m'])
    with pytest.raises(ValueError, match='need bsel'):
        SS.tree_sparse_attention(*args[:2], c['bsel'][:, :3], *args[3:], block_size=16)
    with pytest.raises(ValueError, match='kv must be'):
        SS.tree_sparse_attention(c['q'], c['kv'][:, :3], *args[2:], block_size=16)
    with pytest.raises(ValueError, match='block_size must be an int'):
        SS.tree_sparse_attention(*args, block_size=0)
    with pytest.raises(ValueError, match='BN must be a power of 2'):
        SS.tree_sparse_attention(*args, block_size=16, config=dict(BN=24))


@pytest.mark.parametrize('select', ['masks', 'lists'])
def test_verify_triton_equals_tree_forward(select, monkeypatch):
    """TREE_ATTN='triton' in the verify (both selection paths; chunks of 32 slots, tiles of 16): every node's logits ==
    tree_forward's, at roots on both sides of dense_len (dense nodes: every block in their bitmap)."""
    monkeypatch.setattr(SS, 'TREE_SELECT', select)
    monkeypatch.setattr(SS, 'TREE_ATTN', 'triton')
    monkeypatch.setattr(SS, 'TREE_KERNEL', dict(SS.TREE_KERNEL, BN=16, CH=32))
    model = model_of(11, dict(SP, use_nope=True) if select == 'masks' else SP)
    e = SparseFastSpec(model, EagleDraft(model.config).eval(), None, depth=3, topk=2, tree_size=6, max_len=128, chunk=16)
    g = torch.Generator().manual_seed(13)
    kinds = set()
    for m in (61, 77, 90):
        check_verify(e, model, m, g)
        kinds |= {bool(x) for x in e._dense}
    assert kinds == {True, False}                                    # dense and sparse nodes both ran through the kernel


@pytest.mark.parametrize('name,value,kw,n', [('TREE_ATTN', 'flash', dict(TREE_KERNEL=dict(SS.TREE_KERNEL, BN=16, CH=32)), 24),
                                          ('TREE_SELECT', 'tensor', dict(ATTN_CHUNK=32), 16)],
                         ids=['attn-triton', 'select-triton'])
def test_greedy_triton_paths_equal_model_generate(monkeypatch, name, value, kw, n):
    """SparseFastSpec with TREE_ATTN='triton' (the attention kernel) or TREE_SELECT='triton' (the selection kernels):
    greedy == the model's own loop past dense_len, rounds accepting drafts; an unknown value of the switch is refused."""
    monkeypatch.setattr(SS, name, 'triton')
    for k, v in kw.items(): monkeypatch.setattr(SS, k, v)
    model = model_of(1, SP, initializer_range=0.3)
    draft = EagleDraft(model.config).eval()
    prompt = torch.randint(3, 97, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = model.generate([prompt], n, stop_ids=[], fast=False)[0]
    e = SparseFastSpec(model, draft, torch.tensor(sorted(set(ref) | {5, 7, 11})), depth=3, topk=2, tree_size=6,
                       max_len=128)
    assert e.generate(prompt, n) == ref
    assert sum(e.last_stats['histogram'][1:]) >= 1                   # a round kept drafted tokens
    monkeypatch.setattr(SS, name, value)
    with pytest.raises(ValueError, match=f"{name} must be one of"):
        e.generate(prompt, 4)


COMPILE_SM90 = r'''
import sys, warnings
import torch
import triton
from minicpm4_core import sparse_spec as SS
from minicpm4_core.kernels._common import interpreter_active
assert not interpreter_active()
# 1. CPU tensors, no interpreter: the torch reference, said once
q, kv = torch.randn(3, 4, 16), torch.randn(40, 4, 16)
bsel, anc = torch.rand(2, 3, 5) < 0.5, torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
bsel[:, :, 4] = True
tblk, m = torch.tensor([4, 4, 4]), torch.tensor([33])
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    got = SS.tree_sparse_attention(q, kv, bsel, anc, tblk, m, block_size=8)
want = SS.masked_tree_attention(q, kv, SS.tree_slots_ok(bsel, anc, tblk, m, 40, 8))
assert torch.equal(got, want)
print('WARNED', [str(x.message) for x in w])
try:
    SS.tree_sparse_attention(q, kv, bsel, anc, tblk, m, block_size=8, backend='triton')
except RuntimeError as e: print('REFUSED', e)
# 2. the kernels compiled ahead of time for sm_90
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.backends import backends
    assert 'nvidia' in backends
except (ImportError, AssertionError) as e:
    print('SKIP', e); sys.exit(0)
sig = dict(Q='*bf16', KV='*bf16', BSEL='*u8', ANC='*u8', TBLK='*i64', MPOS='*i64', PO='*fp32', PM='*fp32', PL='*fp32',
           **{k: 'i32' for k in ('sq_t sq_h skv_n skv_h sb_h sb_t sa_t T G HKV NRT NCH CH'.split())}, qk_scale='fp32')
for G, D, BN, BLOCK, BRANCH in [(8, 64, 64, 64, True), (16, 128, 64, 64, True), (8, 64, 64, 64, False), (4, 128, 16, 8, True)]:
    const = dict(RT=64, GP=G, D=D, BD=D, BN=BN, BLOCK=BLOCK, NBC=8, ONE=BLOCK % BN == 0, BRANCH=BRANCH, PREC='tf32')
    triton.compile(ASTSource(SS._tree_attn_kernel, dict(sig, **{k: 'constexpr' for k in const}), const),
                   target=GPUTarget('cuda', 90, 32), options=dict(num_warps=4, num_stages=2))
const = dict(RT=64, GP=8, D=64, BD=64, SP=64)
csig = dict(PO='*fp32', PM='*fp32', PL='*fp32', O='*bf16', **{k: 'i32' for k in 'so_t so_h T G HKV NRT NSPLIT'.split()})
triton.compile(ASTSource(SS._tree_combine_kernel, dict(csig, **{k: 'constexpr' for k in const}), const),
               target=GPUTarget('cuda', 90, 32), options=dict(num_warps=1))
print('COMPILED')
# 3. the selection: CPU fallback said once, then its two kernels for sm_90
from types import SimpleNamespace
st = SimpleNamespace(kernel_size=8, kernel_stride=4, block_size=8, init_blocks=1, local_blocks=2, topk=3,
                     selection='minicpm4')
g = SS.tree_geometry(torch.tensor([33]), torch.tensor([0, 1, 1]), anc, 8, 4, 40, 8)
dense = torch.tensor([False, False, True])
r = SS.tree_round_masks(g, st, dense, 9, 5)
qs, kc, kn = torch.randn(3, 4, 16), torch.randn(9, 2, 16), torch.randn(3, 2, 16)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    got = SS.tree_select_bitmap(qs, kc, kn, g, r, st, 5, dense)
assert torch.equal(got, SS.tree_slot_mask(qs, kc, kn, g, r, st, 5, bitmap=True))
print('WARNED', [str(x.message) for x in w])
lsig = dict(Q='*bf16', KC='*bf16', KN='*bf16', NC='*i64', NEW='*u8', DENSE='*u8', S='*fp32', PM='*fp32', PL='*fp32',
            CNT='*i32', **{k: 'i32' for k in 'sq_t sq_h sc_n sc_h sk_t sk_h NCMAX NCH'.split()}, qk_scale='fp32',
            G='i32', HKV='i32')
psig = dict(S='*fp32', PM='*fp32', PL='*fp32', POS='*i64', DENSE='*u8', SC='*fp32', OUT='*u8', CNT='*i32', CS='*i64',
            **{k: 'i32' for k in 'so_h so_t NCMAX NCH NB NPC G HKV INIT LOCAL KTOP'.split()})
for G, D, NB, SEL, DIG, CAP in [(8, 64, 256, 0, 2, 0), (16, 128, 2048, 0, 2, 128), (8, 64, 512, 1, 2, 0),
                                (8, 64, 8192, 0, 1, 256)]:
    const = dict(ROWS=16, D=D, BD=D, KT=64, PREC='tf32')
    triton.compile(ASTSource(SS._tsel_logits_kernel, dict(lsig, **{k: 'constexpr' for k in const}), const),
                   target=GPUTarget('cuda', 90, 32), options=dict(num_warps=4))
    const = dict(ROWS=16, R=4, LEFT=1, NBC=64, BLOCK=64, CHP=64, SEL=SEL, NBP=NB, DIG=DIG, V=1 << DIG, FENCE=True,
                 CAP=CAP, GN=128)
    triton.compile(ASTSource(SS._tsel_pool_kernel, dict(psig, **{k: 'constexpr' for k in const}), const),
                   target=GPUTarget('cuda', 90, 32), options=dict(num_warps=4))
print('COMPILED_SEL')
'''


def test_tree_kernels_cpu_fallback_and_compile_for_h200():
    """In a process without TRITON_INTERPRET: on CPU tensors tree_sparse_attention runs the torch reference and says so
    once (backend='triton' refuses); the interpreter does not compile, so the two kernels are compiled ahead of time
    for sm_90 (the H200; no GPU needed) in bf16 at the 0.5B / 8B head shapes, both tile-skip modes and a multi-block
    tile; the same for the two selection kernels (tree_select_bitmap). The compile part is skipped only where this Triton
    has no NVIDIA backend."""
    import os, subprocess, sys
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    r = subprocess.run([sys.executable, '-c', COMPILE_SM90], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'WARNED' in r.stdout and 'no Triton interpreter; using masked_tree_attention on the slot mask' in r.stdout
    assert "REFUSED tree_sparse_attention(backend='triton') on CPU tensors needs the Triton interpreter" in r.stdout
    if 'SKIP' in r.stdout: pytest.skip(r.stdout.strip().splitlines()[-1])
    assert 'COMPILED' in r.stdout, r.stdout[-2000:]
    assert 'no Triton interpreter; using tree_slot_mask' in r.stdout          # the selection's fallback, said once
    assert 'COMPILED_SEL' in r.stdout, r.stdout[-2000:]


# ---- the per-layer selection in two Triton kernels (tree_select_bitmap; the interpreter on the CPU)

def select_case(T, Hq, Hkv, D, nb, m, seed, st, ints=False, dup=0):
    """Fresh random scoring inputs for T nodes of a random tree (depth <= 3) at root m: kc over the whole buffer's
    kernels (entries from nc on are stale but random), knew, ~25% dense nodes (node 0 sparse). ints: values in
    {-1, 0, 1} (exact dot products, so equal logits are equal in every summation order: exact ties); dup: that many
    kernels copied onto other kernels (and one onto each node's knew) to force ties between blocks."""
    g = torch.Generator().manual_seed(seed)
    par, dep = random_tree(T - 1, 3, g)
    anc = tree_attention_mask(par)
    NC = (nb * st.block_size - st.kernel_size) // st.kernel_stride + 1
    rnd = (lambda *s: torch.randint(-1, 2, s, generator=g).float()) if ints else (lambda *s: torch.randn(*s, generator=g))
    q, kc, kn = rnd(T, Hq, D), rnd(NC, Hkv, D), rnd(T, Hkv, D)
    for _ in range(dup):
        a, b = torch.randint(0, NC, (2,), generator=g).tolist()
        kc[b] = kc[a]
    if dup: kn[:] = kc[torch.randint(0, NC, (T,), generator=g)]
    geo = SS.tree_geometry(torch.tensor([m]), dep, anc, st.kernel_size, st.kernel_stride, nb * st.block_size,
                           st.block_size)
    dense = torch.rand(T, generator=g) < 0.25
    dense[0] = False
    r = SS.tree_round_masks(geo, st, dense, NC, nb)
    return q, kc, kn, geo, r, dense


def torch_scores(q, kc, kn, r, st, nb):
    "tree_slot_mask's block scores before its sort: (T, Hkv, nb) float32, forced blocks +-inf."
    T, Hkv, D = kn.shape
    qf = q.view(T, Hkv, -1, D)
    logit = torch.where(r['is_nc'], torch.einsum('tgrd,tgd->tgr', qf, kn)[..., None] * D ** -0.5,
                        torch.einsum('tgrd,jgd->tgrj', qf, kc) * D ** -0.5).masked_fill(r['kinvalid'], float('-inf'))
    pooled = SS._pool_to_blocks(torch.softmax(logit, -1).sum(2), nb, st.kernel_size, st.kernel_stride, st.block_size)
    return torch.where(r['forced'], r['fval'], pooled)


def sel_settings(**kw):
    from types import SimpleNamespace
    return SimpleNamespace(**dict(dict(kernel_size=8, kernel_stride=4, block_size=8, init_blocks=1, local_blocks=2,
                                       topk=3, selection='minicpm4'), **kw))


@pytest.mark.parametrize('T,Hq,Hkv,D,nb,roots,kw,case', [
    (9, 4, 2, 16, 13, (62, 77, 90), dict(), dict()),                                        # the test model's shape
    (9, 8, 2, 32, 21, (99, 140), dict(selection='minicpm4.1', topk=5, init_blocks=2), dict()),
    (7, 6, 2, 16, 19, (100, 129), dict(kernel_size=12, init_blocks=2, topk=4), dict()),     # 2 kernels of overlap,
                                                                                                  # G = 3 (padded)
    (9, 4, 1, 16, 37, (130, 279), dict(block_size=16, local_blocks=0, topk=4), dict()),    # no window, r = 4
    (17, 8, 2, 16, 29, (103, 200), dict(topk=6), dict(ints=True, dup=12)),                 # exact ties
    (9, 4, 2, 16, 29, (100, 151), dict(selection='minicpm4.1', topk=6, init_blocks=2), dict(ints=True, dup=12)),
], ids=['tiny', 'minicpm4.1-init2', 'p12-G3', 'nowindow-bs16', 'ties', 'ties-minicpm4.1'])
def test_select_bitmap_equals_tree_slot_mask(T, Hq, Hkv, D, nb, roots, kw, case):
    """tree_select_bitmap == tree_slot_mask(bitmap=True) bit for bit (top-k with the stable sort's tie-breaking, window,
    dense rows) at several roots (nodes with and without a path kernel), two launch configs (chunks that split the
    kernels and blocks unevenly; the defaults: one chunk)."""
    st = sel_settings(**kw)
    news, ties, paths = set(), 0, set()
    for i, m in enumerate(roots):
        q, kc, kn, geo, r, dense = select_case(T, Hq, Hkv, D, nb, m, 7 * i + T, st, **case)
        want = SS.tree_slot_mask(q, kc, kn, geo, r, st, nb, bitmap=True)
        for cfg in (dict(KT=16, NBC=8), None)[:2 if i == 0 else 1] + (dict(CAP=CAND_CAP, GN=CAND_GN),):   # radix; cands
            got = SS.tree_select_bitmap(q, kc, kn, geo, r, st, nb, dense, config=cfg)
            assert got.shape == (Hkv, T, nb) and got.dtype == torch.bool
            assert torch.equal(got, want), f"root {m} cfg {cfg}: {(got ^ want).nonzero()[:6].tolist()}"
        assert want[:, dense].all() and not want[:, ~dense].all()
        news |= {bool(x) for x in geo['new'][~dense]}
        sc = torch_scores(q, kc, kn, r, st, nb)[~dense]
        paths |= set(cand_counts(sc, min(st.topk, nb), CAND_GN).le(CAND_CAP).flatten().tolist())   # which branch
        if case.get('ints'):                                   # sparse rows whose k-th score ties with an unpicked block
            kth = sc.sort(-1, descending=True).values[..., st.topk - 1:st.topk]
            picked = (want.permute(1, 0, 2) & ~r['add'])[~dense]
            ties += int(((sc == kth) & ~picked & (kth > 0)).any(-1).sum())
    assert news == {True, False}                               # sparse nodes with and without their path's kernel
    if case.get('ints'): assert ties >= 3                      # the tie-breaking decided rows
    if case.get('ints'): assert paths == {True, False}         # ranked candidates and the radix fallback both ran


CAND_CAP, CAND_GN = 8, 8                                        # _row_keep_cand's test config


def test_select_cap_switches_on_the_row_length():
    """TREE_SELECT_KERNEL's default (CAP None): the radix top-k below CAND_FROM blocks, ranked candidates (CAND_CAP) from
    there on (H200: faster at 2,048 blocks, slower at 264-520); an explicit CAP wins. The switched launch gives the
    same bitmap as the reference (CAND_FROM lowered so a test-sized row crosses it); bad CAND_CAP refused."""
    c = SS.TREE_SELECT_KERNEL
    assert (SS._select_cap(c, 2047), SS._select_cap(c, 2048), SS._select_cap(c, 4096)) == (0, c['CAND_CAP'], c['CAND_CAP'])
    assert SS._select_cap(dict(c, CAP=0), 4096) == 0 and SS._select_cap(dict(c, CAP=16), 10) == 16
    st = sel_settings(topk=6)
    q, kc, kn, geo, r, dense = select_case(17, 8, 2, 16, 29, 200, 3, st, ints=True, dup=12)
    want = SS.tree_slot_mask(q, kc, kn, geo, r, st, 29, bitmap=True)
    for cfg in (dict(CAND_FROM=29, CAND_CAP=CAND_CAP, GN=CAND_GN), dict(CAND_FROM=30, CAND_CAP=CAND_CAP, GN=CAND_GN)):
        assert torch.equal(SS.tree_select_bitmap(q, kc, kn, geo, r, st, 29, dense, config=cfg), want), cfg
    with pytest.raises(ValueError, match='CAND_CAP'):
        SS.tree_select_bitmap(q, kc, kn, geo, r, st, 29, dense, config=dict(CAND_FROM=1, CAND_CAP=12))


def cand_counts(sc, kk, GN):
    "How many blocks reach the kk-th largest of GN interleaved group maxima (`_row_keep_cand`'s candidates), per row."
    nbp = 1 << (sc.shape[-1] - 1).bit_length()
    pad = torch.nn.functional.pad(sc, (0, nbp - sc.shape[-1]), value=float('-inf'))
    gm = pad.view(*sc.shape[:-1], nbp // GN, GN).amax(-2)
    if kk > GN: return torch.full(sc.shape[:-1], sc.shape[-1])          # no bound: every block
    th = gm.sort(-1, descending=True).values[..., kk - 1:kk]
    return (sc >= th).sum(-1)


@pytest.mark.parametrize('attn', ['split', 'triton'])
def test_verify_triton_select_equals_tree_forward(attn, monkeypatch):
    """TREE_SELECT='triton' in the verify, with the split SDPA (the bitmap gathered to the slot mask) and with the
    Triton attention (the bitmap read directly): every node's logits == tree_forward's on both sides of dense_len."""
    monkeypatch.setattr(SS, 'TREE_SELECT', 'triton')
    monkeypatch.setattr(SS, 'TREE_ATTN', attn)
    monkeypatch.setattr(SS, 'ATTN_CHUNK', 24 if attn == 'split' else None)
    monkeypatch.setattr(SS, 'TREE_KERNEL', dict(SS.TREE_KERNEL, BN=16, CH=32))
    monkeypatch.setattr(SS, 'TREE_SELECT_KERNEL', dict(SS.TREE_SELECT_KERNEL, KT=16, NBC=4))
    model = model_of(11, dict(SP, use_nope=True) if attn == 'split' else dict(SP, init_blocks=2, kernel_size=12, topk=4))
    e = SparseFastSpec(model, EagleDraft(model.config).eval(), None, depth=3, topk=2, tree_size=6, max_len=128, chunk=16)
    g = torch.Generator().manual_seed(14)
    kinds, new = set(), 0
    for m in (61, 90):
        check_verify(e, model, m, g)
        kinds |= {bool(x) for x in e._dense}
        new += int((e._g['new'] & ~e._dense).sum())
    assert kinds == {True, False} and new >= 1
