"""UltraClean filtering of local text files (or a `datasets` dataset): rules, fastText quality score, exact and
MinHash near-duplicate removal -> parquet shards of the kept documents with their scores, and a summary.

    python data_recipes/ultraclean.py --config data_recipes/ultraclean.yaml
    python data_recipes/ultraclean.py --files a.jsonl b.jsonl --classifier clf.bin --out runs/ultraclean
    python data_recipes/ultraclean.py --demo-mb 100 --out runs/ultraclean_demo     # writes ~100 MB of demo input
                                                                                  # (with planted junk and duplicates) first

Two stages, both resumable:
1. *map*: the input is streamed in shards of `shard_docs` documents; each shard is annotated by `datasets.map` with
   `num_proc` processes (rule verdict, classifier score, exact key, MinHash signature) and written to
   `<out>/stage1/shard-NNNNN.parquet` under a temporary name, then renamed. A rerun skips shards that exist (and
   were made with the same settings: `<out>/config.json`), so a killed run loses at most the shards in flight.
2. *reduce*: the signatures of all shards decide duplicates globally (first occurrence kept); kept documents go to
   `<out>/kept/shard-NNNNN.parquet` (text, doc_id, score), written to `kept.tmp/` and renamed when complete;
   `<out>/summary.json` counts kept/dropped by reason and the throughput.
Reasons, in order of precedence: `rule:<name>` (minicpm4_core.ultraclean.RULES), `exact_duplicate`,
`near_duplicate`, `low_quality` (score < threshold; only when a classifier is given).
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

DEFAULTS = dict(files=[], text_field='text', dataset=None, dataset_config=None, dataset_split='train', classifier=None,
                threshold=0.5, rules=True, out='runs/ultraclean', shard_docs=20000, num_proc=2, num_perm=128, bands=16,
                ngram=5, near_threshold=0.7, demo_mb=0, seed=0, max_docs=None)
SETTINGS_KEYS = ('text_field', 'dataset', 'dataset_config', 'dataset_split', 'classifier', 'threshold', 'rules',
                 'shard_docs', 'num_perm', 'bands', 'ngram', 'near_threshold', 'max_docs', 'files')


def parse(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--config', help='YAML file with any of the keys below')
    ap.add_argument('--files', nargs='*', help='local .jsonl/.parquet/.txt files (.txt: one document per file)')
    ap.add_argument('--text-field', dest='text_field')
    ap.add_argument('--dataset', help='a `datasets` name or local folder, streamed (instead of --files)')
    ap.add_argument('--dataset-config', dest='dataset_config')
    ap.add_argument('--dataset-split', dest='dataset_split')
    ap.add_argument('--classifier', help='fastText model saved by QualityClassifier.save (none: no quality filter)')
    ap.add_argument('--threshold', type=float)
    ap.add_argument('--no-rules', dest='rules', action='store_const', const=False)
    ap.add_argument('--out')
    ap.add_argument('--shard-docs', dest='shard_docs', type=int)
    ap.add_argument('--num-proc', dest='num_proc', type=int)
    ap.add_argument('--num-perm', dest='num_perm', type=int)
    ap.add_argument('--bands', type=int)
    ap.add_argument('--ngram', type=int)
    ap.add_argument('--near-threshold', dest='near_threshold', type=float)
    ap.add_argument('--demo-mb', dest='demo_mb', type=float, help='first write this many MB of demo input to <out>/demo_input')
    ap.add_argument('--max-docs', dest='max_docs', type=int)
    ap.add_argument('--seed', type=int)
    a = vars(ap.parse_args(argv))
    cfg = dict(DEFAULTS)
    path = a.pop('config')
    if path:
        import yaml
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(loaded) - set(DEFAULTS)
        if unknown: raise SystemExit(f"unknown config keys {sorted(unknown)}; accepted: {sorted(DEFAULTS)}")
        cfg.update(loaded)
    cfg.update({k: v for k, v in a.items() if v is not None})
    if cfg['shard_docs'] < 1 or cfg['num_proc'] < 1: raise SystemExit("shard_docs and num_proc must be >= 1")
    if not 0 <= cfg['threshold'] <= 1: raise SystemExit(f"threshold must be in [0, 1], got {cfg['threshold']}")
    if cfg['classifier'] and not Path(cfg['classifier']).is_file():
        raise SystemExit(f"classifier {cfg['classifier']} does not exist (a file written by QualityClassifier.save)")
    if cfg['num_perm'] % cfg['bands']: raise SystemExit(f"num_perm ({cfg['num_perm']}) must be a multiple of bands ({cfg['bands']})")
    return cfg


# ---------------------------------------------------------------- input
def _iter_file(p: Path, field: str):
    "Yield (doc_id, text) of one file, with errors that name the file, the line and what was expected."
    if not p.exists(): raise FileNotFoundError(f"input file {p} does not exist")
    if p.stat().st_size == 0: raise ValueError(f"input file {p} is empty (no documents)")
    if p.suffix == '.parquet':
        import pyarrow.parquet as pq
        f = pq.ParquetFile(p)
        if field not in f.schema_arrow.names:
            raise KeyError(f"{p}: no column {field!r}; columns: {f.schema_arrow.names} (set --text-field)")
        i = 0
        for b in f.iter_batches(columns=[field], batch_size=4096):
            for t in b.column(0).to_pylist():
                yield f'{p.name}:{i}', t or ''; i += 1
        return
    try:
        if p.suffix == '.txt':
            yield f'{p.name}:0', p.read_text(encoding='utf-8'); return
        if p.suffix != '.jsonl': raise ValueError(f"{p}: unsupported file type {p.suffix!r}; accepted: .jsonl, .parquet, .txt")
        with open(p, encoding='utf-8') as fh:
            for i, line in enumerate(fh):
                if not line.strip(): continue
                try: rec = json.loads(line)
                except json.JSONDecodeError as e: raise ValueError(f"{p}:{i + 1}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or field not in rec:
                    keys = list(rec) if isinstance(rec, dict) else type(rec).__name__
                    raise KeyError(f"{p}:{i + 1}: record has no field {field!r}; it has {keys} (set --text-field)")
                yield f'{p.name}:{i}', str(rec[field])
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                         f"convert it first, e.g. iconv -f latin1 -t utf-8") from None


def iter_docs(cfg):
    "(doc_id, text) of the whole input, streamed."
    if cfg['dataset']:
        import datasets
        ds = datasets.load_dataset(cfg['dataset'], cfg['dataset_config'], split=cfg['dataset_split'], streaming=True)
        for i, rec in enumerate(ds):
            if cfg['text_field'] not in rec:
                raise KeyError(f"dataset {cfg['dataset']!r} has no column {cfg['text_field']!r}; columns: {list(rec)}")
            yield rec.get('doc_id', f"{cfg['dataset']}:{i}"), rec[cfg['text_field']]
        return
    if not cfg['files']: raise SystemExit("no input: give --files, --dataset or --demo-mb")
    for f in cfg['files']: yield from _iter_file(Path(f), cfg['text_field'])


def shards(cfg):
    "Lists of (doc_id, text) of shard_docs documents each."
    buf, n = [], 0
    for rec in iter_docs(cfg):
        buf.append(rec); n += 1
        if cfg['max_docs'] and n >= cfg['max_docs']: break
        if len(buf) == cfg['shard_docs']: yield buf; buf = []
    if buf: yield buf
    if n == 0: raise ValueError("the input holds no documents")


# ---------------------------------------------------------------- demo input
def make_demo(out: Path, mb: float, seed: int = 0, docs_per_file: int = 20000) -> list[str]:
    """~mb MB of .jsonl with planted truth: clean chunks of the real corpora (the embedded world's prose when they
    are not built), ~35% corrupted, ~5% exact and ~5% near duplicates. Field `truth`: clean / kind / *_duplicate."""
    import random
    from minicpm4_core import ultraclean as U
    from minicpm4_core import data as D
    out.mkdir(parents=True, exist_ok=True)
    done = out / 'DONE'
    if done.exists(): return json.loads(done.read_text())
    try:
        clean = []
        for name in U.CLEAN_REAL + ('nlp_corpus',):
            t = list(D.load_corpus(name, 'all')['text'])
            if name in ('gcide', 'nlp_corpus'): t = ['\n'.join(t[i:i + 8]) for i in range(0, len(t), 8)]
            clean += U.chunk_words(t, 150)
        src = 'real corpora'
    except (FileNotFoundError, ValueError):
        clean = U.clean_documents('embedded', 20000, 0, seed)['default']; src = 'embedded world'
    rng = random.Random(seed)
    files, size, i, k, fh, recent = [], 0, 0, 0, None, []
    target = int(mb * 1e6)
    while size < target:
        if i % docs_per_file == 0:
            if fh: fh.close()
            files.append(str(out / f'part-{len(files):04d}.jsonl')); fh = open(files[-1] + '.tmp', 'w')
        r = rng.random()
        base = clean[k % len(clean)]; k += 1
        if k > len(clean): base = U.corrupt(base, U.CORRUPTIONS[k % 5], rng)   # beyond one pass: all junk, all new
        if r < 0.05 and recent: text, truth = rng.choice(recent), 'exact_duplicate'
        elif r < 0.10 and recent: text, truth = U.near_duplicate(rng.choice(recent), rng), 'near_duplicate'
        elif r < 0.45: kind = U.CORRUPTIONS[i % 5]; text, truth = U.corrupt(base, kind, rng), kind
        else: text, truth = base, 'clean' if k <= len(clean) else 'junk'
        if truth == 'clean' and rng.random() < 0.05: recent = (recent + [text])[-1000:]
        fh.write(json.dumps(dict(text=text, truth=truth)) + '\n')
        size += len(text.encode()); i += 1
    fh.close()
    for f in files: os.replace(f + '.tmp', f)
    done.write_text(json.dumps(files))
    print(f"demo input: {i:,} documents, {size / 1e6:.1f} MB from the {src}, in {len(files)} files under {out}")
    return files


# ---------------------------------------------------------------- stage 1: map
_CLF = {}


def _annotate(batch, classifier=None, rules=True, num_perm=128, ngram=5):
    "datasets.map function: rule verdict, score, exact key and MinHash signature of a batch of texts."
    from minicpm4_core import ultraclean as U
    if classifier and classifier not in _CLF: _CLF[classifier] = U.QualityClassifier.load(classifier)
    key = (num_perm, ngram)
    if key not in _CLF: _CLF[key] = U.MinHasher(num_perm, ngram)
    texts = batch['text']
    out = dict(rule=[(U.rule_reason(t) or '') if rules else '' for t in texts],
               score=(_CLF[classifier].score(texts).tolist() if classifier else [1.0] * len(texts)),
               exact_key=[U.exact_key(t) for t in texts])
    out['minhash'] = [s.tobytes() for s in _CLF[key].signatures(texts)]
    return out


def _settings(cfg) -> dict:
    return {k: cfg[k] for k in SETTINGS_KEYS}


def stage1(cfg, out: Path) -> dict:
    import datasets
    from tqdm.auto import tqdm
    datasets.disable_progress_bars()
    # Import the package (and torch with it) and load the classifier once, here: datasets.map forks its workers for
    # every shard, and a forked worker inherits them, where an import in each worker cost ~2-3 CPU-seconds per shard
    # and process (the largest share of the recipe's CPU time before this).
    _annotate(dict(text=['warm up']), classifier=cfg['classifier'], rules=cfg['rules'], num_perm=cfg['num_perm'],
              ngram=cfg['ngram'])
    st = out / 'stage1'; st.mkdir(parents=True, exist_ok=True)
    cpath = out / 'config.json'
    if cpath.exists() and json.loads(cpath.read_text()) != _settings(cfg):
        raise SystemExit(f"{out} holds a run with other settings ({cpath}); use another --out or delete it")
    cpath.write_text(json.dumps(_settings(cfg), indent=1))
    stats = dict(shards=0, skipped=0, docs=0, bytes=0, seconds=0.0)
    t0 = time.time()
    for si, shard in enumerate(tqdm(shards(cfg), desc='map (shards)', unit='shard')):
        dst = st / f'shard-{si:05d}.parquet'
        stats['shards'] += 1; stats['docs'] += len(shard)
        if dst.exists(): stats['skipped'] += 1; continue
        ds = datasets.Dataset.from_dict(dict(doc_id=[d for d, _ in shard], text=[t for _, t in shard]))
        ds = ds.map(_annotate, batched=True, batch_size=1000, num_proc=min(cfg['num_proc'], max(1, len(shard) // 1000)),
                    fn_kwargs=dict(classifier=cfg['classifier'], rules=cfg['rules'], num_perm=cfg['num_perm'],
                                   ngram=cfg['ngram']))
        tmp = dst.with_suffix('.tmp')
        ds.to_parquet(str(tmp))
        os.replace(tmp, dst)
        if os.environ.get('MINICPM4_UC_TEST_PAUSE'):   # test hook: hold after each shard so a test can kill mid-run
            time.sleep(float(os.environ['MINICPM4_UC_TEST_PAUSE']))
        stats['bytes'] += sum(len(t.encode('utf-8', 'surrogatepass')) for _, t in shard)
    stats['seconds'] = time.time() - t0
    return stats


# ---------------------------------------------------------------- stage 2: reduce
def stage2(cfg, out: Path) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm
    from minicpm4_core import ultraclean as U
    files = sorted((out / 'stage1').glob('shard-*.parquet'))
    if not files: raise SystemExit(f"no stage-1 shards under {out / 'stage1'}")
    t0 = time.time()
    cols = [pq.read_table(f, columns=['rule', 'score', 'exact_key', 'minhash']) for f in files]
    sizes = [len(c) for c in cols]
    rule = [r for c in cols for r in c.column('rule').to_pylist()]
    score = np.concatenate([c.column('score').to_numpy() for c in cols])
    keys = [k for c in cols for k in c.column('exact_key').to_pylist()]
    sig = np.frombuffer(b''.join(b for c in cols for b in c.column('minhash').to_pylist()), np.uint32).reshape(len(rule), -1)
    reason = [f'rule:{r}' if r else '' for r in rule]
    seen = set()
    for i, k in enumerate(keys):
        if reason[i]: continue
        if k in seen: reason[i] = 'exact_duplicate'
        seen.add(k)
    dup = U.near_duplicates(sig, cfg['bands'], cfg['near_threshold'], keep=np.array([not r for r in reason]))
    for i in np.flatnonzero(dup >= 0): reason[i] = 'near_duplicate'
    if cfg['classifier']:
        for i in np.flatnonzero(score < cfg['threshold']):
            if not reason[i]: reason[i] = 'low_quality'
    tmp, kept = out / 'kept.tmp', out / 'kept'
    shutil.rmtree(tmp, ignore_errors=True); tmp.mkdir()
    off = 0
    for f, n in tqdm(list(zip(files, sizes)), desc='reduce (write kept)', unit='shard'):
        t = pq.read_table(f, columns=['doc_id', 'text', 'score'])
        mask = pa.array([not r for r in reason[off:off + n]])
        pq.write_table(t.filter(mask), tmp / f.name)
        off += n
    shutil.rmtree(kept, ignore_errors=True); os.replace(tmp, kept)
    from collections import Counter
    c = Counter(r or 'kept' for r in reason)
    return dict(docs=len(reason), kept=c.pop('kept', 0), dropped=dict(sorted(c.items())), seconds=time.time() - t0)


def main(argv=None) -> dict:
    cfg = parse(argv)
    out = Path(cfg['out'])
    out.mkdir(parents=True, exist_ok=True)
    if cfg['demo_mb']:
        cfg['files'] = make_demo(out / 'demo_input', cfg['demo_mb'], cfg['seed'], max(1000, cfg['shard_docs']))
    s1 = stage1(cfg, out)
    s2 = stage2(cfg, out)
    in_bytes = sum(Path(f).stat().st_size for f in cfg['files']) if cfg['files'] else None
    summary = dict(input_files=len(cfg['files']), input_bytes=in_bytes, map=s1, reduce=s2,
                   map_mb_per_s=(s1['bytes'] / 1e6 / s1['seconds']) if s1['seconds'] and s1['bytes'] else None,
                   settings=_settings(cfg), num_proc=cfg['num_proc'])
    (out / 'summary.json').write_text(json.dumps(summary, indent=1))
    print(json.dumps(dict(docs=s2['docs'], kept=s2['kept'], dropped=s2['dropped'], map_shards=s1['shards'],
                          skipped=s1['skipped'], map_seconds=round(s1['seconds'], 1),
                          map_mb_per_s=summary['map_mb_per_s'] and round(summary['map_mb_per_s'], 2))))
    return summary


if __name__ == '__main__':
    main()
