"""Tokenizers for megatron-ling: any local HF tokenizer directory, or a built-in offline BPE.

LingTokenizer duck-types what megatron.core's GPTDatasetConfig.tokenizer needs (vocab_size, eod,
pad, unique_identifiers) plus tokenize/detokenize for preprocessing and sampling.

Ling's tokenizer uses one id for eos and pad ("<|endoftext|>", FACTS.md); the built-in tokenizer
copies that convention on purpose, so that the pad==eos path is exercised by every quick start.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from typing import Any

from megatron_ling.data.config import BUILTIN_TOKENIZER, _check_tokenizer_dir
from megatron_ling.config_utils import read_json
from megatron_ling.errors import LingConfigError

EOT = "<|endoftext|>"
BUILTIN_VOCAB_SIZE = 2048
# Bump when the built-in tokenizer recipe changes (invalidates caches).
_BUILTIN_RECIPE = "bytelevel-bpe-v2"
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


def default_cache_dir() -> str:
    """$MEGATRON_LING_CACHE, else $XDG_CACHE_HOME/megatron_ling, else ~/.cache/megatron_ling."""
    if os.environ.get("MEGATRON_LING_CACHE"):
        return os.environ["MEGATRON_LING_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_ling")


def _token_content(tok: Any) -> str | None:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict):
        return tok.get("content")
    return None


class LingTokenizer:
    """A tokenizer usable as megatron.core GPTDatasetConfig.tokenizer.

    Built from a ``tokenizers.Tokenizer`` (fast path, no transformers needed) or, for directories
    without tokenizer.json, from a transformers tokenizer.
    """

    def __init__(self, backend: Any, eod: int, pad: int, name: str, identity: str, kind: str,
                 eod_token: str, pad_token: str):
        self._backend = backend
        self._kind = kind  # "tokenizers" | "transformers"
        self.eod = int(eod)
        self.pad = int(pad)
        self.name = name
        self.eod_token = eod_token
        self.pad_token = pad_token
        # megatron hashes this dict (json) into its dataset-index cache names
        # (megatron/core/datasets/megatron_dataset.py:66-71), so it must identify the vocabulary.
        # Content only (not the name or path), so a tokenizer found by two routes shares caches.
        self.unique_identifiers = {"class": "LingTokenizer", "sha256": identity, "eod": self.eod, "pad": self.pad}

    # -- megatron.core tokenizer interface --------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self._kind == "tokenizers":
            return self._backend.get_vocab_size(with_added_tokens=True)
        return len(self._backend)

    @property
    def eos(self) -> int:
        return self.eod

    def tokenize(self, text: str) -> list[int]:
        if self._kind == "tokenizers":
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend(text, add_special_tokens=False)["input_ids"]

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        if self._kind == "tokenizers":
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        return self._backend(texts, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: Any) -> str:
        ids = [int(i) for i in ids]
        if self._kind == "tokenizers":
            return self._backend.decode(ids, skip_special_tokens=False)
        return self._backend.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def __repr__(self) -> str:
        return f"LingTokenizer({self.name!r}, vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"

    # -- persistence ------------------------------------------------------------------------------
    def save(self, directory: str) -> str:
        """Write an HF-loadable tokenizer directory (tokenizer.json + configs), atomically."""
        directory = os.path.abspath(directory)
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        tmp = f"{directory}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            if self._kind == "tokenizers":
                self._backend.save(os.path.join(tmp, "tokenizer.json"))
                cfg = {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "eos_token": self.eod_token,
                    "pad_token": self.pad_token,
                    "bos_token": None,
                    "unk_token": None,
                    "add_bos_token": False,
                    "add_eos_token": False,
                    "clean_up_tokenization_spaces": False,
                    "model_max_length": 1_000_000_000,
                }
                with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                    json.dump(cfg, f, indent=2)
                with open(os.path.join(tmp, "special_tokens_map.json"), "w") as f:
                    json.dump({"eos_token": self.eod_token, "pad_token": self.pad_token}, f, indent=2)
            else:
                self._backend.save_pretrained(tmp)
            if os.path.exists(directory):
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory


def _sha256_files(directory: str, names: list[str]) -> str:
    h = hashlib.sha256()
    for n in sorted(names):
        p = os.path.join(directory, n)
        if os.path.isfile(p):
            h.update(n.encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _read_json(path: str, field: str) -> dict:
    """An optional JSON object of the tokenizer directory ({} when absent)."""
    if not os.path.exists(path):
        return {}
    d = read_json(path, field)
    if not isinstance(d, dict):
        raise LingConfigError(f"{field}: {path} must hold a JSON object, got {type(d).__name__}")
    return d


def _from_directory(path: str, field: str) -> LingTokenizer:
    _check_tokenizer_dir(path, field)
    cfg = _read_json(os.path.join(path, "tokenizer_config.json"), field)
    stm = _read_json(os.path.join(path, "special_tokens_map.json"), field)
    eos_tok = _token_content(cfg.get("eos_token")) or _token_content(stm.get("eos_token"))
    pad_tok = _token_content(cfg.get("pad_token")) or _token_content(stm.get("pad_token"))
    tj = os.path.join(path, "tokenizer.json")
    name = os.path.basename(os.path.normpath(path))
    if os.path.isfile(tj):
        from tokenizers import Tokenizer

        _read_json(tj, field)  # one line for an unreadable, non-UTF-8 or malformed file
        try:
            backend = Tokenizer.from_file(tj)
        except Exception as e:  # the Rust parser's own error for a JSON file that is no tokenizer
            raise LingConfigError(f"{field}: {tj} is not a tokenizers file ({str(e).splitlines()[0][:120]}); "
                                  f"save the tokenizer with save_pretrained") from None
        kind = "tokenizers"
        vocab = backend.get_vocab(with_added_tokens=True)
        identity = _sha256_files(path, ["tokenizer.json"])

        def to_id(tok):
            return vocab.get(tok) if tok is not None else None
    else:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the install
            raise LingConfigError(
                f"{field}: {path!r} has no tokenizer.json, and loading it needs transformers; "
                "pip install 'megatron-ling[hf]' or save the tokenizer with tokenizer.json"
            ) from e
        backend = AutoTokenizer.from_pretrained(path, local_files_only=True)
        kind = "transformers"
        identity = _sha256_files(path, os.listdir(path))
        eos_tok = eos_tok or backend.eos_token
        pad_tok = pad_tok or backend.pad_token

        def to_id(tok):
            if tok is None:
                return None
            i = backend.convert_tokens_to_ids(tok)
            return None if i is None or i == backend.unk_token_id else i

    eod = to_id(eos_tok)
    if eod is None:  # no (resolvable) eos in the configs: fall back to the usual names
        for cand in _EOS_CANDIDATES:
            if to_id(cand) is not None:
                eos_tok, eod = cand, to_id(cand)
                break
    if eod is None:
        raise LingConfigError(
            f"{field}: tokenizer at {path!r} defines no end-of-document token; set \"eos_token\" in its "
            "tokenizer_config.json"
        )
    pad = to_id(pad_tok)
    if pad is None:  # Ling convention: pad == eos
        pad, pad_tok = eod, eos_tok
    return LingTokenizer(backend, eod, pad, name, identity, kind, eos_tok, pad_tok)


def train_builtin_tokenizer(texts, vocab_size: int = BUILTIN_VOCAB_SIZE):
    """Train the built-in byte-level BPE (deterministic for a fixed text order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level: every string round-trips exactly, with no unknown token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],  # id 0; used as both eos and pad, as in Ling
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def builtin_tokenizer_key(corpus_max_bytes: int, vocab_size: int = BUILTIN_VOCAB_SIZE) -> str:
    """Cache key of the built-in tokenizer: recipe, vocab, corpus size, Python and tokenizers version."""
    import tokenizers

    return (f"{_BUILTIN_RECIPE}-v{vocab_size}-c{corpus_max_bytes}-py{sys.version_info[0]}{sys.version_info[1]}"
            f"-tk{tokenizers.__version__}")


def build_builtin_tokenizer(directory: str, corpus_max_bytes: int | None = None,
                            vocab_size: int = BUILTIN_VOCAB_SIZE) -> str:
    """Train the built-in tokenizer on the built-in corpus and save it to ``directory``."""
    from megatron_ling.data.corpus import DEFAULT_MAX_BYTES, iter_documents

    max_bytes = DEFAULT_MAX_BYTES if corpus_max_bytes is None else corpus_max_bytes
    texts = [d["text"] for d in iter_documents(max_bytes)]
    backend = train_builtin_tokenizer(texts, vocab_size)
    eod = backend.token_to_id(EOT)
    identity = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
    LingTokenizer(backend, eod, eod, "builtin", identity, "tokenizers", EOT, EOT).save(directory)
    return directory


def load_tokenizer(path: str | None, cache_dir: str | None = None) -> LingTokenizer:
    """Load a tokenizer.

    path: a local HF tokenizer directory (tokenizer.json, or anything transformers'
        AutoTokenizer loads with local_files_only=True); None or "builtin" for the built-in
        byte-level BPE (vocab 2048, "<|endoftext|>" = eos = pad), trained offline on the built-in
        corpus on first use and cached under ``cache_dir`` (default: default_cache_dir()).
    """
    if path is None or path == BUILTIN_TOKENIZER:
        tok = _from_directory(builtin_tokenizer_dir(cache_dir), "data.tokenizer")
        tok.name = "builtin"
        return tok
    return _from_directory(path, "data.tokenizer")


def builtin_tokenizer_dir(cache_dir: str | None = None) -> str:
    """Directory of the built-in tokenizer under cache_dir, training it first if it is not there.

    Safe to call from several processes at once (file lock; the first trains, the rest reuse).
    """
    from megatron_ling.data.corpus import DEFAULT_MAX_BYTES
    from megatron_ling.data.locking import file_lock

    root = cache_dir or default_cache_dir()
    directory = os.path.join(root, f"builtin-tokenizer-{builtin_tokenizer_key(DEFAULT_MAX_BYTES)}")
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        with file_lock(directory + ".lock"):
            if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
                build_builtin_tokenizer(directory, DEFAULT_MAX_BYTES)
    return directory
