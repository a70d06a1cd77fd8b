import json
import math
import random
import re

import pytest
import torch

from minicpm4_core import data as D


def test_corpus_is_deterministic_and_seed_dependent():
    a, b, c = D.embedded_corpus(0, 300), D.embedded_corpus(0, 300), D.embedded_corpus(1, 300)
    assert a == b
    assert a["train"] != c["train"]
    assert len(a["train"]) == 300 and len(a["valid"]) >= 50
    assert D.make_world(3) == D.make_world(3)


def test_documents_state_true_facts():
    w = D.make_world(0)
    rng = random.Random(0)
    for p in w.people[:10]:
        doc = D.person_document(p, rng)
        for attr in D.ATTRIBUTES:
            assert getattr(p, attr) in doc
    qa = D.fact_questions(w)
    assert len(qa) == 4 * len(w.people)
    q, a = qa[0]
    assert q.endswith("Answer:") and a.strip() == w.people[0].city


def test_addition_worked_is_correct():
    rng = random.Random(1)
    for _ in range(200):
        a, b = rng.randrange(10 ** rng.randint(1, 4)), rng.randrange(10 ** rng.randint(1, 4))
        txt = D.addition_worked(a, b)
        assert txt.endswith(f"Answer: {a + b}.")
        # the written digits, read back from the steps, spell the answer
        digits = re.findall(r"write (\d+)", txt)
        assert int("".join(reversed(digits[:-1])) and digits[-1] + "".join(reversed(digits[:-1])) or digits[-1]) == a + b
    with pytest.raises(ValueError):
        D.addition_worked(-1, 2)


def test_needle_item_depth_and_length():
    tok = D.train_tokenizer(D.embedded_corpus(0, 300)["train"], 400)
    for depth in (0.0, 0.5, 1.0):
        it = D.needle_item(300, depth, seed=2, tokenizer=tok)
        n = len(tok.encode(it.prompt))
        assert 0.8 * 300 <= n <= 300, n
        needle_len = len(it.context) - len(it.context.replace(f"The pass key is{it.answer}. Remember it.{it.answer} is the pass key.", ""))
        pos = it.context.index("The pass key is") / (len(it.context) - needle_len)
        assert abs(pos - depth) < 0.1
        assert it.answer.strip() in it.context
    with pytest.raises(ValueError, match="depth"):
        D.needle_item(10, 1.5)


def test_quality_dataset_labels():
    ds = D.quality_dataset(60, seed=0)
    assert sum(r["label"] for r in ds) == 30
    kinds = {r["kind"] for r in ds if r["label"] == 0}
    assert kinds == set(D.LOW_QUALITY_KINDS)
    assert D.quality_dataset(60, seed=0) == ds
    with pytest.raises(ValueError, match="kind must be one of"):
        D.low_quality_text("a b c", "typo", random.Random(0))


def test_tokenizer_round_trip_and_special_ids(tmp_path):
    texts = D.embedded_corpus(0, 300)["train"]
    tok = D.train_tokenizer(texts, 400)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.vocab_size == 400
    for t in texts[:20] + ["unseen wörds ✓ 12345"]:
        assert tok.decode(tok.encode(t)) == t
    tok.save(tmp_path)
    tok2 = D.load_tokenizer(tmp_path)
    assert tok2.encode(texts[0]) == tok.encode(texts[0])
    with pytest.raises(ValueError, match="vocab_size must be"):
        D.train_tokenizer(texts, 100)


@pytest.mark.parametrize("ext", ["txt", "jsonl", "parquet"])
def test_read_texts_local_files(tmp_path, ext):
    texts = [f"document number {i} with some words" for i in range(7)]
    p = tmp_path / f"docs.{ext}"
    if ext == "txt": p.write_text("\n".join(texts) + "\n")
    elif ext == "jsonl": p.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    else:
        import pyarrow as pa, pyarrow.parquet as pq
        pq.write_table(pa.table({"text": texts}), p)
    assert list(D.read_texts(p)) == texts
    if ext == "jsonl":
        with pytest.raises(KeyError, match="no field 'body'"):
            list(D.read_texts(p, text_field="body"))


def test_read_texts_bad_input(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        list(D.read_texts(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError):
        list(D.read_texts(tmp_path / "missing.txt"))


def test_pack_documents():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
    rows = D.pack_documents(docs, seq_len=4)
    stream = [1, 10, 11, 12, 2, 1, 20, 21, 2, 1, 30, 31, 32, 33, 2]
    assert rows.shape == (3, 5) and rows.flatten().tolist() == stream
    with pytest.raises(ValueError, match="not enough tokens"):
        D.pack_documents([[1]], seq_len=100)


def test_batches_cover_rows():
    rows = torch.arange(40).view(10, 4)
    it = D.batches(rows, 5, seed=0)
    epoch = torch.cat([next(it), next(it)])
    assert sorted(epoch[:, 0].tolist()) == rows[:, 0].tolist()


def test_unigram_entropy():
    assert D.unigram_entropy(torch.arange(8).repeat(5)) == pytest.approx(math.log(8))
    assert D.unigram_entropy([3, 3, 3]) == pytest.approx(0.0)


# ---------------------------------------------------------------------------- load_corpus (real text, offline)
def _write_built(root, name, docs):
    "A corpus folder as the recipe writes it (train/heldout parquet + manifest), split with heldout_split."
    import datasets
    folder = root / name
    folder.mkdir(parents=True)
    for split in ("train", "heldout"):
        recs = [d for d in docs if D.heldout_split(d["doc_id"]) == split]
        datasets.Dataset.from_list(recs).to_parquet(str(folder / f"{split}.parquet"))
    (folder / "manifest.json").write_text(json.dumps({"name": name, "license": "test"}))


def test_load_corpus_built_by_name(tmp_path, monkeypatch):
    rng = random.Random(5)
    docs = [dict(text=f"text {i} " + "w" * rng.randint(1, 9), source="brown", doc_id=f"brown/c{i:03d}", license="x",
                 meta="{}") for i in range(300)]
    _write_built(tmp_path, "brown", docs)
    tr, ho, al = (D.load_corpus("brown", s, root=tmp_path) for s in ("train", "heldout", "all"))
    assert len(ho) > 0 and len(tr) + len(ho) == len(al) == 300
    assert sorted(al["doc_id"]) == sorted(d["doc_id"] for d in docs)
    assert not set(tr["doc_id"]) & set(ho["doc_id"])
    assert all(D.heldout_split(i) == "heldout" for i in list(ho["doc_id"]))
    assert list(D.load_corpus(tmp_path / "brown", "heldout")["doc_id"]) == list(ho["doc_id"])      # the folder itself
    monkeypatch.setenv("MINICPM4_DATA", str(tmp_path))
    assert D.corpora_root() == tmp_path and len(D.load_corpus("brown")) == len(tr)
    assert list(D.built_corpora()) == ["brown"]
    with pytest.raises(FileNotFoundError, match=r"not built .* run `python data_recipes/real_corpora.py --corpora austen`"):
        D.load_corpus("austen")


@pytest.mark.parametrize("ext", ["txt", "jsonl"])
def test_load_corpus_local_files(tmp_path, ext):
    rng = random.Random(ext == "txt")
    files = []
    for k in range(2):
        texts = [f"line {k}-{i} " + " ".join(rng.choice("abcdef") for _ in range(5)) for i in range(150)]
        p = tmp_path / f"part{k}.{ext}"
        p.write_text("\n".join(texts if ext == "txt" else [json.dumps({"body": t}) for t in texts]) + "\n")
        files.append((p, texts))
    kw = {} if ext == "txt" else {"text_field": "body"}
    al = D.load_corpus([p for p, _ in files], "all", **kw)
    assert list(al["text"]) == files[0][1] + files[1][1]
    assert list(al["doc_id"])[150] == f"part1.{ext}:0"
    tr, ho = D.load_corpus([p for p, _ in files], "train", **kw), D.load_corpus([p for p, _ in files], "heldout", **kw)
    assert sorted([*tr["doc_id"], *ho["doc_id"]]) == sorted(al["doc_id"]) and len(ho) > 0
    assert all(D.heldout_split(i) == "heldout" for i in list(ho["doc_id"]))
    assert list(D.load_corpus(files[0][0], "all", **kw)["text"]) == files[0][1]                # one path as a str/Path


def test_load_corpus_bad_input(tmp_path, monkeypatch):
    import datasets
    with pytest.raises(ValueError, match="split must be one of"):
        D.load_corpus("brown", "test")
    with pytest.raises(FileNotFoundError):
        D.load_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not a corpus built by"):
        D.load_corpus(tmp_path / "plain")
    with pytest.raises(ValueError, match="empty list"):
        D.load_corpus([])
    with pytest.raises(TypeError, match="name_or_paths must be"):
        D.load_corpus(42)
    with pytest.raises(ValueError, match="did you mean 'austen'"):            # a typo: answered without the hub
        D.load_corpus("austin")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match=r"neither a built corpus .*real_corpora.py.* hub is offline"):
        D.load_corpus("someone/some-dataset")
