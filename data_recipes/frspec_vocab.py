"""FR-Spec frequency vocabulary for any tokenizer folder + local text files (or the embedded corpus).

Counts token ids over the texts (streamed, with a progress bar), keeps the top-k ids for each k with EOS forced in,
and writes one `freq_vocab_<k>.safetensors` per k (ids, counts, metadata; load with
`minicpm4_core.frspec.FreqVocab.load`), `coverage.json` and `coverage.png`.

    python data_recipes/frspec_vocab.py --config data_recipes/frspec_vocab.yaml
    python data_recipes/frspec_vocab.py --tokenizer path/to/model --files a.jsonl b.jsonl --ks 8192 16384 --out out/
"""
import argparse
import sys
from pathlib import Path

DEFAULTS = dict(tokenizer=None, files=[], text_field='text', max_texts=1_000_000, ks=[8192, 16384, 32768],
                eos_ids=None, out='runs/frspec_vocab', batch_size=1000)


def parse(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--config', help='YAML file with any of the keys below')
    ap.add_argument('--tokenizer', help='folder or tokenizer.json; default: the ci base model tokenizer')
    ap.add_argument('--files', nargs='*', help='local text files (one extension); default: the embedded corpus')
    ap.add_argument('--text-field', dest='text_field')
    ap.add_argument('--max-texts', dest='max_texts', type=int)
    ap.add_argument('--ks', nargs='+', type=int)
    ap.add_argument('--eos-ids', dest='eos_ids', nargs='+', type=int)
    ap.add_argument('--out')
    ap.add_argument('--batch-size', dest='batch_size', type=int)
    a = vars(ap.parse_args(argv))
    cfg = dict(DEFAULTS)
    if a.pop('config'):
        import yaml
        loaded = yaml.safe_load(Path(ap.parse_args(argv).config).read_text()) or {}
        unknown = set(loaded) - set(DEFAULTS)
        if unknown: raise SystemExit(f"unknown config keys {sorted(unknown)}; accepted: {sorted(DEFAULTS)}")
        cfg.update(loaded)
    cfg.update({k: v for k, v in a.items() if v is not None})
    if not cfg['ks'] or any(k < 1 for k in cfg['ks']): raise SystemExit(f"ks must be positive ints, got {cfg['ks']}")
    return cfg


def main(argv=None) -> dict:
    cfg = parse(argv)
    from minicpm4_core import data as D
    from minicpm4_core import frspec as S
    from minicpm4_core.io import atomic_path, atomic_write_json
    if cfg['tokenizer']:
        tok = D.load_tokenizer(cfg['tokenizer'])
    else:
        from minicpm4_core.train import profile_base_model
        _, tok, _ = profile_base_model('ci', 'cpu')
    if cfg['files']:
        texts, total, source = D.read_texts(cfg['files'], cfg['text_field']), None, [str(f) for f in cfg['files']]
    else:
        texts = D.embedded_corpus(0, 'large')['train']
        total, source = len(texts), 'embedded corpus (large)'
    eos = cfg['eos_ids'] if cfg['eos_ids'] is not None else [tok.eos_id]
    counts = S.count_token_frequencies(texts, tok, tok.vocab_size, batch_size=cfg['batch_size'],
                                       max_texts=cfg['max_texts'], eos_id=tok.eos_id, total=total)
    out = Path(cfg['out']); out.mkdir(parents=True, exist_ok=True)
    V = tok.vocab_size
    ks = sorted({min(k, V) for k in cfg['ks']})
    report = dict(source=source, tokenizer=cfg['tokenizer'] or 'ci base model', vocab_size=V,
                  tokens=int(counts.sum()), ids_seen=int((counts > 0).sum()), eos_ids=eos, subsets={})
    for k in ks:
        fv = S.build_freq_vocab(counts, k, eos, source=str(source), tokenizer=report['tokenizer'])
        p = fv.save(out / f'freq_vocab_{k}.safetensors')
        report['subsets'][str(k)] = dict(path=str(p), coverage=fv.coverage, share_of_vocab=k / V)
        print(f"k={k:6d} ({k / V:6.1%} of the vocabulary) covers {fv.coverage:7.2%} of {report['tokens']} tokens -> {p}")
    atomic_write_json(out / 'coverage.json', report, indent=1)          # every file written whole or not at all
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ax = S.plot_coverage(counts, mark=ks)
    ax.set_title(f"FR-Spec coverage: {report['ids_seen']} of {V} ids seen")
    plt.tight_layout()
    with atomic_path(out / 'coverage.png') as tmp: plt.savefig(tmp, dpi=110, format='png')
    return report


if __name__ == '__main__':
    main(sys.argv[1:])
