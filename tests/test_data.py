"""megatron_ling.data: tokenizer, preprocess -> .bin/.idx -> megatron GPTDataset, blends,
padding by position (pad == eos), resumable sampler, multi-rank build, bad input."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings

import numpy
import pytest
import torch

from megatron_ling.data import DataConfig
from megatron_ling.data.cli import main as preprocess_main
from megatron_ling.data.corpus import iter_documents
from megatron_ling.data.tokenizer import EOT, BUILTIN_VOCAB_SIZE, builtin_tokenizer_dir, load_tokenizer
from megatron_ling.errors import LingConfigError

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ling_cache"))


@pytest.fixture(scope="module")
def tok(cache):
    return load_tokenizer(None, cache)


@pytest.fixture(scope="module")
def docs():
    """Real documents of the built-in corpus (ASCII only, so token prefixes decode to string prefixes)."""
    out = [d["text"] for d in iter_documents(600_000) if d["text"].isascii() and len(d["text"]) > 1500]
    assert len(out) >= 60
    return out[:60]


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    """A world-size-1 gloo group: megatron's dataset builder needs one (see build_datasets)."""
    if torch.distributed.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("pg") / "store"
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def write_jsonl(path, texts, key="text"):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({key: t, "meta": 1}) + "\n")
    return str(path)


def run_preprocess(cache, inp, prefix, *extra):
    rc = preprocess_main(["--input", *([inp] if isinstance(inp, str) else inp), "--output-prefix", str(prefix),
                          "--tokenizer", "builtin", "--cache-dir", cache, "--no-progress", *extra])
    assert rc == 0
    return str(prefix)


@pytest.fixture(scope="module")
def prefix(tmp_path_factory, cache, docs, tok):
    d = tmp_path_factory.mktemp("data")
    return run_preprocess(cache, write_jsonl(d / "docs.jsonl", docs), d / "docs")


# ------------------------------------------------------------------------------------ corpus
def test_builtin_corpus_is_deterministic_real_text(tmp_path):
    from megatron_ling.data.corpus import MAX_DOC_CHARS, write_corpus

    a = write_corpus(str(tmp_path / "a.jsonl"), 1_000_000)
    b = write_corpus(str(tmp_path / "b.jsonl"), 1_000_000)
    assert a.sha256 == b.sha256 and a.num_documents == b.num_documents > 100
    assert 1_000_000 <= a.num_bytes < 1_000_000 + MAX_DOC_CHARS * 4
    rows = [json.loads(l) for l in open(a.path)]
    sizes = sorted(len(r["text"]) for r in rows)
    assert sizes[-1] <= MAX_DOC_CHARS and sizes[len(sizes) // 2] > 1000  # documents of sensible size
    assert any("def " in r["text"] for r in rows) and any('"""' in r["text"] for r in rows)
    assert len({r["source"] for r in rows}) == len(rows) and sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.jsonl"]


# ------------------------------------------------------------------------------------ tokenizer
@pytest.mark.quiet
def test_builtin_tokenizer_roundtrip_eod_is_pad(tok, cache, tmp_path):
    assert tok.vocab_size == BUILTIN_VOCAB_SIZE == 2048
    assert tok.eod == tok.pad == tok._backend.token_to_id(EOT)
    for s in ["def f(x):\n    return x ** 2  # squared\n", "héllo wörld — 世界 🙂\t\r\n  ", "", "a" * 1000]:
        ids = tok.tokenize(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == s
    text = next(iter_documents(10_000))["text"]
    assert len(tok.tokenize(text)) < len(text.encode()) / 2  # BPE actually compresses real text
    # Cached: a second load is a file read, and the identity is stable.
    t = time.time()
    again = load_tokenizer(None, cache)
    assert time.time() - t < 1.0 and again.unique_identifiers == tok.unique_identifiers
    # Deterministic: retraining from scratch gives a byte-identical tokenizer.json.
    other = builtin_tokenizer_dir(str(tmp_path))
    with open(os.path.join(other, "tokenizer.json"), "rb") as a, \
            open(os.path.join(builtin_tokenizer_dir(cache), "tokenizer.json"), "rb") as b:
        assert a.read() == b.read()
    # The saved directory is a real HF tokenizer: transformers loads it and agrees on ids / eos / pad.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(other, local_files_only=True)
    assert hf.eos_token_id == hf.pad_token_id == tok.eod
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.tokenize(text)
    # ... and loading that directory by path (the HF-directory route) gives the same tokenizer.
    by_path = load_tokenizer(other)
    assert (by_path.vocab_size, by_path.eod, by_path.pad) == (tok.vocab_size, tok.eod, tok.pad)
    assert by_path.unique_identifiers == tok.unique_identifiers


def test_hf_directory_eos_pad_resolution(tok, cache, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    # tokenizer.json only (no configs): EOD found by its conventional name, pad falls back to EOD.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(builtin_tokenizer_dir(cache), "tokenizer.json"), bare / "tokenizer.json")
    t = load_tokenizer(str(bare))
    assert (t.eod, t.pad, t.vocab_size) == (tok.eod, tok.eod, tok.vocab_size)
    # A separate pad token in tokenizer_config.json is honoured (and EOD comes from eos_token).
    wl = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "<pad>": 2, "hello": 3, "world": 4}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wdir = tmp_path / "wl"
    wdir.mkdir()
    wl.save(str(wdir / "tokenizer.json"))
    (wdir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": {"content": "<pad>"}}))
    t = load_tokenizer(str(wdir))
    assert (t.eod, t.pad, t.vocab_size) == (1, 2, 5) and t.tokenize("hello world") == [3, 4]
    # No end-of-document token at all: one line naming the field.
    (wdir / "tokenizer_config.json").write_text("{}")
    wl2 = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    wl2.save(str(wdir / "tokenizer.json"))
    with pytest.raises(LingConfigError) as e:
        load_tokenizer(str(wdir))
    _one_line(str(e.value), "data.tokenizer", "eos_token")


# ------------------------------------------------------------------------------------ preprocess
def test_preprocess_indexed_gpt_roundtrip(prefix, docs, tok, cache, pg):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ling.data.datasets import build_datasets

    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs) and ds.index.dtype == numpy.uint16
    for i in (0, 7, len(docs) - 1):
        assert ds[i].tolist() == tok.tokenize(docs[i]) + [tok.eod]
    assert tok.detokenize(ds[3][:-1]) == docs[3]

    seq = 32
    cfg = DataConfig(paths=[prefix], split="100,0,0", cache_dir=cache)
    train, valid, test = build_datasets(cfg, tok, seq, (200, 0, 0))
    assert valid is None and test is None and len(train) >= 200
    starts = 0
    for i in range(len(train)):
        s = train[i]
        assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert s["tokens"].shape == (seq,) and torch.equal(s["tokens"][1:], s["labels"][:-1])
        assert torch.equal(s["position_ids"], torch.arange(seq))
        text = tok.detokenize(s["tokens"].tolist() + s["labels"][-1:].tolist())
        # Every piece between EODs is a piece of one real input document.
        assert all(any(p in d for d in docs) for p in text.split(EOT))
        # ... and exactly the token window megatron's indices point at in the IndexedDataset.
        pos, offset = (int(x) for x in train.sample_index[train.shuffle_index[i]])
        first_doc = int(train.document_index[pos])
        window = list(ds[first_doc][offset:])
        while len(window) < seq + 1:
            pos += 1
            window += list(ds[int(train.document_index[pos])])
        assert s["tokens"].tolist() + s["labels"][-1:].tolist() == window[: seq + 1]
        if offset == 0:  # the sample starts a document: it decodes to that document's prefix
            doc = docs[first_doc]
            assert doc.startswith(text) and len(text) > 20
            starts += 1
    assert starts >= 1


def test_preprocess_workers_identical_and_force(tmp_path, docs, cache, prefix, capsys):
    inp = write_jsonl(tmp_path / "d.jsonl", docs[:30])
    a = run_preprocess(cache, inp, tmp_path / "a")
    b = run_preprocess(cache, inp, tmp_path / "b", "--workers", "2")
    assert open(a + ".bin", "rb").read() == open(b + ".bin", "rb").read()
    assert open(a + ".idx", "rb").read() == open(b + ".idx", "rb").read()
    # refuses to overwrite, then --force replaces it (with different content)
    before = open(a + ".bin", "rb").read()
    assert preprocess_main(["--input", inp, "--output-prefix", a, "--tokenizer", "builtin", "--cache-dir", cache]) == 2
    assert "--force" in capsys.readouterr().err
    run_preprocess(cache, write_jsonl(tmp_path / "e.jsonl", docs[30:40]), a, "--force")
    assert open(a + ".bin", "rb").read() != before
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "b.bin", "b.idx", "d.jsonl", "e.jsonl"]


# ------------------------------------------------------------------------------------ blends
def test_weighted_blend_draws_in_ratio(tmp_path, docs, tok, cache, pg):
    from megatron.core.datasets.blended_dataset import BlendedDataset

    from megatron_ling.data.datasets import build_datasets

    # Same real text, lower-cased in A and upper-cased in B, so a sample's text names its source.
    lo = run_preprocess(cache, write_jsonl(tmp_path / "lo.jsonl", [d.lower() for d in docs[:30]]), tmp_path / "lo")
    up = run_preprocess(cache, write_jsonl(tmp_path / "up.jsonl", [d.upper() for d in docs[30:]]), tmp_path / "up")
    cfg = DataConfig(paths=["0.7", lo, "0.3", up], split="90,10,0", cache_dir=cache)
    n = 400
    train, valid, _ = build_datasets(cfg, tok, 32, (n, 40, 0))
    assert isinstance(train, BlendedDataset) and len(train) == n
    from_lo = 0
    for i in range(n):
        s = train[i]
        text = tok.detokenize(s["tokens"].tolist()).replace(EOT, "")
        is_lo = not any(c.isupper() for c in text)
        is_up = not any(c.islower() for c in text)
        assert is_lo != is_up or not any(c.isalpha() for c in text)
        assert (int(s["dataset_id"]) == 0) == is_lo or not any(c.isalpha() for c in text)
        from_lo += int(s["dataset_id"]) == 0
    assert abs(from_lo / n - 0.7) < 0.02
    assert len(valid) == 40


# ------------------------------------------------------------------------------------ pad == eos
def test_padding_masked_by_position_not_by_id(tmp_path, tok, cache, pg):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megatron_ling.data.datasets import LingGPTDataset, gpt_dataset_config

    # Short real sentences: every sample holds several EODs (== pad id in Ling's convention).
    lines = [l.strip() for l in next(iter_documents(20_000))["text"].splitlines() if len(l.strip()) > 20][:40]
    p = run_preprocess(cache, write_jsonl(tmp_path / "s.jsonl", lines), tmp_path / "s")
    seq = 16
    cfg = DataConfig(paths=[p], split="1,1,0", cache_dir=str(tmp_path / "c"))

    def build(cls, **kw):
        conf = gpt_dataset_config(cfg, tok, seq, drop_last_partial_validation_sequence=False, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return BlendedMegatronDatasetBuilder(cls, [None, None, None], lambda: True, conf).build()[1]

    valid = build(LingGPTDataset)
    total = int(valid.dataset.sequence_lengths[valid.indices].sum())  # real tokens in the split
    n_real_last = total - (len(valid) - 1) * seq  # tokens of the last, partial sample
    assert 1 < n_real_last < seq + 1, "the split must end in a partially padded sample"
    eos_label_positions = 0
    for i in range(len(valid)):
        s = valid[i]
        last = valid.shuffle_index[i] == len(valid) - 1
        real_labels = n_real_last - 1 if last else seq
        expect = torch.zeros(seq)
        expect[:real_labels] = 1
        assert torch.equal(s["loss_mask"], expect), f"sample {i}"
        is_eos = s["labels"][:real_labels] == tok.eod
        eos_label_positions += int(is_eos.sum())  # ... all of which kept loss_mask 1 above
        if last:  # padding carries the pad id (a real embedding row), masked by position
            assert (s["tokens"][n_real_last:] == tok.pad).all() and (s["labels"][real_labels:] == tok.pad).all()
    assert eos_label_positions >= 10
    assert valid[None]["loss_mask"].sum() == 0  # megatron's batch-padding sample

    # Contrast: stock GPTDataset deciding padding by id (pad == eos) drops every EOS from the loss.
    stock = build(GPTDataset, allow_ambiguous_pad_tokens=True)
    s0, l0 = stock[0], valid[0]
    assert torch.equal(s0["tokens"][s0["tokens"] != 0], l0["tokens"][s0["tokens"] != 0])
    eos = l0["labels"] == tok.eod
    assert eos.any() and (s0["loss_mask"][eos] == 0).all() and (l0["loss_mask"][eos] == 1).all()


def test_eod_mask_loss_and_mock(tok, prefix, cache, pg):
    from megatron_ling.data.datasets import build_datasets

    train = build_datasets(DataConfig(paths=[prefix], cache_dir=cache, eod_mask_loss=True), tok, 64, (50, 5, 0))[0]
    s = next(train[i] for i in range(len(train)) if (train[i]["tokens"] == tok.eod).any())
    assert torch.equal(s["loss_mask"], (s["tokens"] != tok.eod).float())
    mock = build_datasets(DataConfig(mock=True, create_attention_mask=True), tok, 16, (8, 2, 2))
    assert all(len(m) >= n for m, n in zip(mock, (8, 2, 2)))
    m = mock[0][0]
    assert m["attention_mask"].shape == (1, 16, 16) and m["tokens"].max() < tok.vocab_size


# ------------------------------------------------------------------------------------ sampler
def test_sampler_resumes_exactly_and_splits_by_dp(prefix, tok, cache, pg):
    from megatron_ling.data.datasets import build_datasets, get_batch_iterator

    train = build_datasets(DataConfig(paths=[prefix], cache_dir=cache), tok, 32, (96, 0, 0))[0]
    full = list(get_batch_iterator(train, 4))
    assert len(full) == len(train) // 4
    it = get_batch_iterator(train, 4)
    for _ in range(5):
        next(it)
    assert it.consumed_samples == 20
    resumed = list(get_batch_iterator(train, 4, consumed_samples=it.consumed_samples))
    assert len(resumed) == len(full) - 5
    for a, b in zip(full[5:], resumed):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # DP=2 x mbs=2 sees exactly the samples of DP=1 x mbs=4, split in rank order, with workers too.
    r0 = list(get_batch_iterator(train, 2, consumed_samples=8, dp_rank=0, dp_size=2, num_workers=2))
    r1 = list(get_batch_iterator(train, 2, consumed_samples=8, dp_rank=1, dp_size=2))
    for k, ref in enumerate(full[2:]):
        assert torch.equal(torch.cat([r0[k]["tokens"], r1[k]["tokens"]]), ref["tokens"])
    with pytest.raises(LingConfigError, match="consumed_samples"):
        get_batch_iterator(train, 4, consumed_samples=10**6)


# ------------------------------------------------------------------------------------ 2 ranks
_WORKER = textwrap.dedent("""
    import hashlib, json, os, sys, time, warnings
    t0 = time.time()
    warnings.filterwarnings("ignore")
    import torch
    from megatron_ling.data import DataConfig, load_tokenizer
    from megatron_ling.data.datasets import build_datasets, get_batch_iterator, resolve_data_config
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cache = sys.argv[1]
    # paths=None: the built-in quick-start corpus, prepared by rank 0 inside build_datasets.
    cfg = DataConfig(cache_dir=cache)
    tok = load_tokenizer(None, cache)
    t1 = time.time()
    train, valid, test = build_datasets(cfg, tok, 64, (64, 8, 0))
    t2 = time.time()
    batch = next(get_batch_iterator(train, 2, consumed_samples=4, dp_rank=rank, dp_size=world))
    digest = hashlib.sha256(b"".join(train[i]["tokens"].numpy().tobytes() for i in range(16))).hexdigest()
    out = dict(rank=rank, len=[len(train), len(valid)], test=test is None, digest=digest,
               first=batch["tokens"][:, :4].tolist(), resolved=resolve_data_config(cfg).paths,
               seconds=dict(startup=round(t1 - t0, 1), build=round(t2 - t1, 1)))
    with open(os.path.join(cache, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.quiet
def test_two_rank_build_with_quickstart(tmp_path, cache):
    module_cache = cache
    from megatron_ling.data.datasets import resolve_data_config

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    cache = tmp_path / "cache"
    # Reuse the module's trained built-in tokenizer (what a second run on one machine would do);
    # the quick-start corpus, its preprocessing and the index caches are still built here.
    shutil.copytree(builtin_tokenizer_dir(module_cache), cache / os.path.basename(builtin_tokenizer_dir(module_cache)))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max_restarts=0", str(script), str(cache)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (json.load(open(cache / f"rank{i}.json")) for i in range(2))
    print("rank0 seconds", r0["seconds"], "rank1 seconds", r1["seconds"])
    assert r0["digest"] == r1["digest"] and r0["len"] == r1["len"] and r0["len"][0] >= 64 and r0["test"]
    assert r0["first"] != r1["first"]  # different DP ranks, different samples
    assert r0["resolved"] == r1["resolved"] and os.path.isfile(r0["resolved"][0] + ".bin")
    caches = [f for _, _, fs in os.walk(cache / "index-cache") for f in fs]  # keyed by dataset identity
    assert any("LingGPTDataset-train" in c for c in caches)
    # The quick start is cached: a later call (e.g. before the next launch) only reads a manifest.
    t = time.time()
    qs = resolve_data_config(DataConfig(cache_dir=str(cache)))
    assert time.time() - t < 0.5 and qs.paths == r0["resolved"] and qs.tokenizer.startswith(str(cache))
    info = json.load(open(cache / "quickstart" / "manifest.json"))["corpus"]
    assert 3_500_000 < info["num_bytes"] < 4_500_000 and info["num_documents"] > 500


# ------------------------------------------------------------------------------------ bad input
def _one_line(msg, *needles):
    assert "\n" not in msg.strip(), msg
    for n in needles:
        assert n in msg, (n, msg)


@pytest.mark.parametrize("kwargs, needles", [
    (dict(paths=["/nonexistent/prefix"]), ["data.paths", "/nonexistent/prefix.bin", "ling-preprocess"]),
    (dict(paths=["0.7", "/a", "0.3"]), ["data.paths", "odd number"]),
    (dict(paths=["0.7", "/a", "heavy", "/b"]), ["data.paths", "'heavy'", "numeric weight"]),
    (dict(paths=["0.7", "/a", "0.3", "0.2"]), ["data.paths", "'0.2'", "prefix"]),
    (dict(paths=["-1", "/a"]), ["data.paths", ">= 0"]),
    (dict(paths="/a/prefix"), ["data.paths", "expected a list"]),
    (dict(paths=[]), ["data.paths", "empty"]),
    (dict(paths=["/a/prefix.bin"]), ["data.paths", "without extension", "'/a/prefix'"]),
    (dict(split="98;2"), ["data.split", "98,2,0"]),
    (dict(split="98,2,x"), ["data.split"]),
    (dict(split="0,50,50"), ["data.split", "train"]),
    (dict(tokenizer="/no/such/dir"), ["data.tokenizer", "not a directory"]),
    (dict(mock=True, paths=["/a"]), ["data.mock", "not both"]),
    (dict(num_workers=-1), ["data.num_workers", ">= 0"]),
    (dict(seed="1"), ["data.seed"]),
    (dict(eod_mask_loss="yes"), ["data.eod_mask_loss", "true or false"]),
])
def test_bad_config_one_line(kwargs, needles):
    with pytest.raises(LingConfigError) as e:
        DataConfig(**kwargs).validate()
    _one_line(str(e.value), *needles)


def test_bad_config_unknown_field_and_empty_tokenizer_dir(tmp_path):
    with pytest.raises(LingConfigError) as e:
        DataConfig.from_dict({"path": ["/a"]})
    _one_line(str(e.value), "data.path", "unknown field", "paths")
    with pytest.raises(LingConfigError) as e:
        DataConfig(tokenizer=str(tmp_path)).validate()
    _one_line(str(e.value), "data.tokenizer", "tokenizer.json")
    assert DataConfig.from_dict({"split": "99,1,0"}).split == "99,1,0"


def test_bad_preprocess_input_one_line_no_output(tmp_path, cache, capsys):
    good = {"text": "x = 1\n"}
    cases = {
        "missing.jsonl": (None, ["--input", "missing.jsonl", "does not exist"]),
        "badjson.jsonl": ([good, good, "{not json"], ["--input", "badjson.jsonl:3", "invalid JSON"]),
        "nokey.jsonl": ([good, {"body": "y"}], ["--json-key", "nokey.jsonl:2", "'text'", "body"]),
        "notstr.jsonl": ([{"text": 5}], ["--json-key", "notstr.jsonl:1", "not a string"]),
        "empty.jsonl": ([{"text": ""}], ["--input", "no non-empty documents"]),
    }
    out = tmp_path / "out"
    out.mkdir()
    for name, (rows, needles) in cases.items():
        path = tmp_path / name
        if rows is not None:
            path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        rc = preprocess_main(["--input", str(path), "--output-prefix", str(out / "o"), "--tokenizer", "builtin",
                              "--cache-dir", cache, "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: "), err
        _one_line(err, *needles)
        assert os.listdir(out) == [], name  # no .bin/.idx and no temporary files left behind
    rc = preprocess_main(["--input", str(tmp_path / "nokey.jsonl"), "--output-prefix", str(out / "o"),
                          "--tokenizer", str(tmp_path / "nodir")])
    _one_line(capsys.readouterr().err, "--tokenizer", "not a directory")
    assert rc == 2 and os.listdir(out) == []
    with pytest.raises(SystemExit):  # argparse: --input is required
        preprocess_main(["--output-prefix", str(out / "o")])
    # The installed console script speaks the same way (exit status 2, one line on stderr).
    script = os.path.join(os.path.dirname(sys.executable), "ling-preprocess")  # the venv's, PATH or not
    r = subprocess.run([script, "--input", str(tmp_path / "badjson.jsonl"), "--output-prefix",
                        str(out / "o"), "--cache-dir", cache], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "badjson.jsonl:3" in r.stderr
    assert os.listdir(out) == []


def test_build_datasets_checks_arguments(tok, prefix, cache):
    from megatron_ling.data.datasets import build_datasets

    with pytest.raises(LingConfigError, match="seq_length"):
        build_datasets(DataConfig(paths=[prefix]), tok, 0, (1, 1, 0))
    with pytest.raises(LingConfigError, match="num_samples"):
        build_datasets(DataConfig(paths=[prefix]), tok, 8, (1, 1))
