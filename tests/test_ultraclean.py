"""UltraClean (nbs/20_ultraclean): normalisation, rules, dedup, classifier I/O, verification, the recipe."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from minicpm4_core import data as D
from minicpm4_core import ultraclean as U

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'data_recipes'))
import ultraclean as R  # noqa: E402  (the recipe script)

torch.set_num_threads(1)
WORDS = [''.join(random.Random(i).choice('abcdefghijklmnopqrstuvwxyz') for _ in range(random.Random(-i).randint(3, 9)))
         for i in range(3000)]


def prose(rng, n_words=120):
    "Random sentences of random words with stop words and punctuation: passes every rule."
    out = []
    while len(out) < n_words:
        s = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
        s.insert(rng.randrange(len(s)), rng.choice(['the', 'of', 'and', 'to', 'with']))
        s.insert(rng.randrange(len(s)), rng.choice(['that', 'have', 'be']))
        out += s[:-1] + [s[-1] + '.']
    return ' '.join(out).capitalize()


def test_normalize_text():
    assert U.normalize_text('Crème  BRÛLÉE\n\n \n\nÅngström\nZ') == 'creme  brulee\n\nangstrom\nz'
    rng = random.Random(1)
    t = prose(rng)
    assert U.normalize_text(t) == t.lower()            # ASCII, no blank lines: only lower-casing
    line = U.fasttext_line('A\n\nB\tC  d\n')
    assert line == 'a b c d' and '\n' not in line
    with pytest.raises(TypeError, match='text must be a str'): U.normalize_text(None)


def test_each_rule_fires_alone():
    rng = random.Random(2)
    clean = [prose(rng) for _ in range(30)]
    assert all(U.rule_reason(t) is None for t in clean)
    t = clean[0]
    cases = {'too_short': 'The cat of the dog.',
             'repetition': ' '.join(['buy the best of deals'] * 20),
             'symbols': t + ' ' + ' '.join(['#$%{}|<>~^'] * 40),
             'encoding': t + ' cafÃ© and naÃ¯ve \ufffd',
             'line_length': '\n'.join(['Home', 'Menu', 'Search', 'Log in', t[:200], 'Share', 'Tweet']),
             'stop_words': ' '.join(w for w in t.split() if w.strip('.').lower() not in U.STOP_WORDS)}
    for rule, text in cases.items():
        assert U.rule_reason(text) == rule, (rule, U.rule_stats(text))


def test_corruptions_and_pools():
    rng = random.Random(3)
    docs = [prose(rng) for _ in range(50)]
    for k in U.CORRUPTIONS:
        c = U.corrupt(docs[0], k, rng)
        assert c != docs[0] and c.strip()
    with pytest.raises(ValueError, match='kind must be one of'): U.corrupt(docs[0], 'nope', rng)
    pools = U.make_pools(docs, [1.0, 0.5, 0.0], 10, seed=0)
    assert [p.quality for p in pools] == [1.0, 0.5, 0.0]
    assert len({d for p in pools for d, c in zip(p.docs, p.clean) if c}) == 15   # disjoint draws
    with pytest.raises(ValueError, match='need 60 clean documents'): U.make_pools(docs, [1.0] * 6, 10)


def _jaccard(a, b, n=5):
    sa = {tuple(a.lower().split()[i:i + n]) for i in range(len(a.split()) - n + 1)}
    sb = {tuple(b.lower().split()[i:i + n]) for i in range(len(b.split()) - n + 1)}
    return len(sa & sb) / len(sa | sb)


def test_minhash_estimates_jaccard_and_dedup_finds_planted():
    rng = random.Random(4)
    docs = [prose(rng, 200) for _ in range(60)]
    near = [U.near_duplicate(d, rng, 0.01) for d in docs[:15]]   # Jaccard ~0.9
    exact = [' '.join(d.upper().split()) for d in docs[15:25]]   # same words, other case and spacing
    texts = docs + near + exact
    mh = U.MinHasher(num_perm=256)
    sig = mh.signatures(texts, max_shingles=3000)                  # several chunks
    est = [(sig[i] == sig[60 + i]).mean() for i in range(15)]
    ref = [_jaccard(docs[i], near[i]) for i in range(15)]
    assert np.abs(np.array(est) - np.array(ref)).max() < 0.12      # 256 permutations: s.d. of the estimate <= 0.031
    assert np.allclose(sig[:5], mh.signatures(docs[:5])), "signatures must not depend on the batch"
    reasons = U.dedup_reasons(texts)
    assert reasons[:60] == [None] * 60
    assert reasons[75:] == ['exact_duplicate'] * 10
    want = ['exact_duplicate' if U.exact_key(n) == U.exact_key(d) else 'near_duplicate' for n, d in zip(near, docs)]
    assert reasons[60:75] == want, [round(x, 2) for x in ref]
    assert want.count('near_duplicate') >= 10



def test_minhash_shingles_are_the_distinct_word_ngrams_of_each_text():
    "Batched shingling: one shingle per distinct 5-gram of each text (none across texts), one for a text of < 5 words."
    rng = random.Random(11)
    pool = ['a', 'bb', 'Bb', 'ccc', 'déjà', '€', 'x\u00a0y', 'z\u2003w'] + WORDS[:20]   # case, accents, Unicode spaces
    texts = [' '.join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(300)] + ['', '  \n ', 'one two']
    mh = U.MinHasher(num_perm=32)
    sh, nsh = mh._all_shingles(texts)
    off = np.cumsum(nsh) - nsh
    for t, o, k in zip(texts, off, nsh):
        w = t.lower().split()
        grams = {tuple(w[i:i + 5]) for i in range(len(w) - 4)} if len(w) >= 5 else {tuple(w)}
        assert len(np.unique(sh[o:o + k])) == len(grams), t     # 32-bit hashes: no collision among a few dozen
    a = mh.signatures(texts, max_shingles=40)
    b = np.stack([mh.signatures([t])[0] for t in texts])
    np.testing.assert_array_equal(a, b)                              # chunking and neighbours change nothing
    np.testing.assert_array_equal(mh.signatures(['X  y z\tw v u'])[0], mh.signatures(['x y z w v u'])[0])


def test_byte_tokenizer_and_packing():
    tok = U.ByteTokenizer()
    rng = random.Random(12)
    texts = [''.join(rng.choice('ab é€\n\t.') for _ in range(rng.randint(0, 40))) for _ in range(200)]
    assert all(tok.decode(tok.encode(t)) == t for t in texts)
    assert min(min(tok.encode(t), default=4) for t in texts) >= 4 and tok.vocab_size == 260
    for L in (1, 7, 33):
        ref = D.pack_documents(tok.encode_batch(texts), L, tok.bos_id, tok.eos_id)     # the general packer
        assert torch.equal(U.pack_texts(tok, texts, L), ref)
    with pytest.raises(ValueError, match='seq_len'): U.pack_texts(tok, texts, 0)
    with pytest.raises(ValueError, match='not enough tokens'): U.pack_texts(tok, ['ab'], 50)
    with pytest.raises(ValueError, match="'bpe' or 'bytes'"): U.make_tokenizer('chars', texts, 300)


def test_device_entry_point_tiny(tmp_path, capsys):
    "The gpu-profile entry point, run on CPU at a tiny size: prepare -> run -> JSON + PNG + summary lines."
    tiny = ["device='cpu'", "source='embedded'", "tokenizer='bytes'", 'seq_len=64', 'batch=8', 'pretrain_steps=30', 'anneal_steps=4',
            'seeds=(0,)', 'qualities=(1.0,0.0)', 'pool_docs=60',
            "model={'hidden_size':32,'num_hidden_layers':1,'intermediate_size':64,'dim_model_base':16}"]
    data = tmp_path / 'docs.json.gz'
    assert U.main(['--profile', 'ci', '--prepare', str(data), '--set', *tiny]) == 0
    d = U.load_device_data(data)
    assert len(d['candidates']) == 120 and len(d['default']) == 30 * 8 // 4
    assert U.main(['--profile', 'ci', '--data', str(data), '--out', str(tmp_path / 'o'), '--no-progress', '--set', *tiny]) == 0
    rec = json.loads((tmp_path / 'o' / 'verification.json').read_text())
    assert (tmp_path / 'o' / 'verification.png').stat().st_size > 0
    assert list(rec['verification']['pools']) == ['q=1.00', 'q=0.00'] and rec['verification']['anneals'] == 3
    assert rec['vocab'] == 260 and rec['config']['tokenizer'] == 'bytes' and 0 < rec['cost']['token_ratio'] < 1
    assert 'Spearman' in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match='--prepare'): U.load_device_data(tmp_path / 'nope.json.gz')
    with pytest.raises(ValueError, match='unknown DeviceRunConfig fields'): U.DeviceRunConfig.for_profile('ci', steps=3)
    with pytest.raises(ValueError, match='model must be a dict'): U.DeviceRunConfig.for_profile('ci', model='big')
    with pytest.raises(SystemExit): U.main(['--profile', 'gpu', '--out', str(tmp_path / 'o2')])   # real source, no --data

def test_classifier_roundtrip_and_separation(tmp_path):
    pytest.importorskip('fasttext')
    rng = random.Random(5)
    pos = [prose(rng, 60) for _ in range(300)]
    neg = [U.corrupt(prose(rng, 60), 'spam', rng) for _ in range(300)]
    clf = U.QualityClassifier.fit(pos[:200], neg[:200], dim=32, epoch=5, threshold=0.4)
    s = clf.score(pos[200:] + neg[200:])
    assert s.shape == (200,) and ((s >= 0) & (s <= 1)).all()
    m = U.precision_recall_f1(s >= 0.5, [True] * 100 + [False] * 100)
    assert m['f1'] > 0.9
    p = clf.save(tmp_path / 'clf.bin')
    back = U.QualityClassifier.load(p)
    assert back.threshold == 0.4 and back.info['params']['dim'] == 32
    np.testing.assert_array_equal(back.score(pos[200:] + neg[200:]), s)
    with pytest.raises(FileNotFoundError): U.QualityClassifier.load(tmp_path / 'missing.bin')
    with pytest.raises(ValueError, match='need positives and negatives'): U.QualityClassifier.fit([], neg)


def test_spearman_and_ci():
    g = np.random.default_rng(6)
    x = g.normal(size=9); y = x + 0.3 * g.normal(size=9)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))   # no ties: ranks by double argsort
    assert abs(U.spearman(x, y) - np.corrcoef(rx, ry)[0, 1]) < 1e-12
    assert U.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1)
    m, h = U.mean_ci([1.0, 2.0, 3.0])
    assert m == 2 and h == pytest.approx(4.303 / 3 ** 0.5)


@pytest.fixture(scope='module')
def tiny_setup():
    docs = U.clean_documents('embedded', n_default=500, n_candidates=400, seed=0)
    tok = D.train_tokenizer(docs['default'], 300)
    cfg = U.model_config(tok, hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, dim_model_base=32)
    base = U.pretrain_stable(tok, docs['default'], 120, cfg, seq_len=32, batch_size=16, progress=False)
    return docs, tok, base


def test_cloze_accuracy_matches_unbatched_reference(tiny_setup):
    docs, tok, base = tiny_setup
    items = U.cloze_items(docs['heldout'], 12, seed=1)
    hits = 0
    with torch.no_grad():
        for ctx, ans, wrong in items:
            c = [tok.bos_id] + tok.encode(ctx)
            lp = []
            for o in [ans] + wrong:
                ids = tok.encode(' ' + o)
                logits = base(torch.tensor([c + ids]))[0].float().log_softmax(-1)
                lp.append(sum(float(logits[len(c) - 1 + j, t]) for j, t in enumerate(ids)))
            hits += int(np.argmax(lp) == 0)
    assert U.cloze_accuracy(base, tok, items, batch_size=5) == pytest.approx(hits / len(items))


def test_verification_ranks_clean_above_junk(tiny_setup):
    docs, tok, base = tiny_setup
    eval_rows = U.pack_texts(tok, docs['heldout'], 32)
    ver = U.Verifier(base, tok, docs['default'], eval_rows[:40], U.cloze_items(docs['heldout'], 20),
                     U.VerifyConfig(steps=15, batch_size=16, seq_len=32, seeds=(0,)))
    clean, junk = U.make_pools(docs['candidates'], [1.0, 0.0], 200, seed=1)
    res = ver.verify({'clean': clean.docs, 'junk': junk.docs}, progress=False)
    assert res['clean']['loss_gain'] > res['junk']['loss_gain'] + 0.01, res
    assert ver.runs == 3                       # two pools + one shared baseline
    with pytest.raises(ValueError, match='no pools'): ver.verify({})


# ------------------------------------------------------------------ the recipe
def _write_jsonl(path, texts, field='text'):
    path.write_text(''.join(json.dumps({field: t}) + '\n' for t in texts))


def _kept(out):
    import pyarrow.parquet as pq
    return [r for f in sorted((out / 'kept').glob('*.parquet')) for r in pq.read_table(f).column('doc_id').to_pylist()]


def test_recipe_bad_inputs(tmp_path):
    (tmp_path / 'empty.jsonl').write_text('')
    with pytest.raises(ValueError, match='empty'): list(R._iter_file(tmp_path / 'empty.jsonl', 'text'))
    (tmp_path / 'latin.jsonl').write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match='not UTF-8'): list(R._iter_file(tmp_path / 'latin.jsonl', 'text'))
    _write_jsonl(tmp_path / 'other.jsonl', ['a b c'], field='content')
    with pytest.raises(KeyError, match="no field 'text'.*content"): list(R._iter_file(tmp_path / 'other.jsonl', 'text'))
    import pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.table({'body': ['x']}), tmp_path / 'p.parquet')
    with pytest.raises(KeyError, match="no column 'text'"): list(R._iter_file(tmp_path / 'p.parquet', 'text'))
    (tmp_path / 'bad.jsonl').write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match='bad.jsonl:2: not valid JSON'): list(R._iter_file(tmp_path / 'bad.jsonl', 'text'))
    with pytest.raises(FileNotFoundError): list(R._iter_file(tmp_path / 'nope.jsonl', 'text'))


def _recipe_inputs(tmp_path):
    rng = random.Random(7)
    texts = [prose(rng, 80) for _ in range(240)]
    w = texts[5].split(); w[40] = 'zzzz'                      # one word changed: Jaccard of 5-grams ~0.88
    texts += [texts[3], ' '.join(w), ' '.join(['spam spam buy now'] * 10)]
    f = tmp_path / 'in.jsonl'; _write_jsonl(f, texts)
    return f


def test_recipe_runs_and_resumes_after_kill(tmp_path):
    f = _recipe_inputs(tmp_path)
    args = ['--files', str(f), '--shard-docs', '60', '--num-proc', '1']
    ref = R.main(args + ['--out', str(tmp_path / 'ref')])
    assert ref['reduce']['dropped'] == {'exact_duplicate': 1, 'near_duplicate': 1, 'rule:repetition': 1}
    assert ref['reduce']['kept'] == 240
    out = tmp_path / 'killed'
    env = dict(os.environ, MINICPM4_UC_TEST_PAUSE='30', OMP_NUM_THREADS='1')   # hold after each shard: a kill lands mid-run
    p = subprocess.Popen([sys.executable, str(ROOT / 'data_recipes' / 'ultraclean.py'), *args, '--out', str(out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.time()
        while not list((out / 'stage1').glob('shard-00000.parquet')):
            assert p.poll() is None and time.time() - t0 < 120, 'recipe ended or hung before its first shard'
            time.sleep(0.2)
    finally:
        os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert not (out / 'summary.json').exists()
    res = R.main(args + ['--out', str(out)])
    assert res['map']['skipped'] >= 1 and res['map']['shards'] == 5
    assert _kept(out) == _kept(tmp_path / 'ref')
    with pytest.raises(SystemExit, match='other settings'): R.main(args[:-2] + ['--num-proc', '1', '--bands', '8', '--out', str(out)])
