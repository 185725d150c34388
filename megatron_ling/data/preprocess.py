"""jsonl text -> Megatron indexed dataset (<prefix>.bin / <prefix>.idx).

Writes through megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder, one sequence per
document (optionally ending in EOD), to temporary names renamed into place only when complete.
Every input line is parsed in the main process, so a bad line is reported as ``file:line``
before anything is renamed, whatever the number of tokenizer workers.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import dataclass
from typing import Iterator

import numpy

from megatron_ling.config_utils import check_output_path
from megatron_ling.errors import LingConfigError

# Batch of documents handed to a tokenizer worker at a time.
_CHUNK_DOCS = 64


@dataclass(frozen=True)
class PreprocessResult:
    prefix: str
    num_documents: int
    num_tokens: int
    num_empty_skipped: int
    dtype: str


def token_dtype(vocab_size: int):
    """uint16 while every id fits (with headroom), else int32 (megatron reads either)."""
    return numpy.uint16 if vocab_size < 65500 else numpy.int32


def _iter_texts(inputs: list[str], json_key: str) -> Iterator[tuple[str, int]]:
    """Yield (text, bytes of its input line); raise LingConfigError naming file:line on bad input."""
    for path in inputs:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise LingConfigError(f"--input: {path}:{lineno}: not UTF-8 ({e.reason}); "
                                          "re-encode the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LingConfigError(f"--input: {path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                          "each line must be one JSON object") from None
                if not isinstance(obj, dict) or json_key not in obj:
                    keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
                    raise LingConfigError(f"--json-key: {path}:{lineno} has no key {json_key!r} (found: {keys}); "
                                          "pass --json-key with the field that holds the text")
                text = obj[json_key]
                if not isinstance(text, str):
                    raise LingConfigError(f"--json-key: {path}:{lineno}: {json_key!r} is {type(text).__name__}, "
                                          "not a string; pass --json-key with the field that holds the text")
                yield text, len(raw)


def _chunks(it: Iterator[tuple[str, int]], n: int) -> Iterator[list[str]]:
    """Group document texts into batches of n."""
    buf: list[str] = []
    for text, _ in it:
        buf.append(text)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


_WORKER_TOKENIZER = None


def _worker_init(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process = one core
    from megatron_ling.data.tokenizer import load_tokenizer

    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir)


def _worker_encode(texts: list[str]) -> list[list[int]]:
    return _WORKER_TOKENIZER.tokenize_batch(texts)


def check_output_prefix(output_prefix: str, force: bool) -> None:
    if not output_prefix or output_prefix.endswith((".bin", ".idx")):
        raise LingConfigError(f"--output-prefix: give a path prefix without .bin/.idx, got {output_prefix!r}")
    check_output_path(os.path.dirname(os.path.abspath(output_prefix)), "--output-prefix")
    existing = [output_prefix + e for e in (".bin", ".idx") if os.path.exists(output_prefix + e)]
    if existing and not force:
        raise LingConfigError(f"--output-prefix: {existing[0]} already exists; pass --force to overwrite "
                              "or choose another prefix")


def preprocess(inputs: list[str], output_prefix: str, tokenizer: str | None = None, json_key: str = "text",
               append_eod: bool = True, workers: int = 1, force: bool = False,
               progress: bool = True, cache_dir: str | None = None) -> PreprocessResult:
    """Tokenize jsonl ``inputs`` into ``<output_prefix>.bin/.idx``.

    tokenizer: a local HF tokenizer directory, or None / "builtin" for the built-in tokenizer
        (cached under cache_dir, see load_tokenizer).
    Empty documents are skipped (and counted): a zero-length sequence would only waste an index entry.
    """
    from megatron_ling.data.config import BUILTIN_TOKENIZER, _check_tokenizer_dir
    from megatron_ling.data.tokenizer import builtin_tokenizer_dir, load_tokenizer

    if not inputs:
        raise LingConfigError("--input: give at least one .jsonl file")
    for p in inputs:
        if not os.path.isfile(p):
            raise LingConfigError(f"--input: {p} does not exist or is not a file; give a .jsonl file with one "
                                  "JSON object per line")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise LingConfigError(f"--workers: expected an integer >= 1, got {workers!r}")
    check_output_prefix(output_prefix, force)
    builtin = tokenizer is None or tokenizer == BUILTIN_TOKENIZER
    if not builtin:
        _check_tokenizer_dir(tokenizer, "--tokenizer")
    # Check every line before writing anything (or training the built-in tokenizer): a bad line
    # fails fast, with its file:line, never after minutes of tokenization (JSON parsing is
    # ~10x cheaper than tokenizing).
    n_input_docs = n_nonempty = 0
    for text, _ in _iter_texts(inputs, json_key):
        n_input_docs += 1
        n_nonempty += bool(text)
    if n_nonempty == 0:
        raise LingConfigError(f"--input: no non-empty documents under key {json_key!r} in {', '.join(inputs)}")
    tokenizer_dir = builtin_tokenizer_dir(cache_dir) if builtin else tokenizer  # workers load it from disk
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except LingConfigError as e:
        raise LingConfigError(str(e).replace("data.tokenizer", "--tokenizer", 1)) from None
    dtype = token_dtype(tokenizer.vocab_size)
    # Heavy imports only once the arguments are known to be good (megatron.core takes seconds).
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp{os.getpid()}"
    tmp_bin, tmp_idx = tmp_prefix + ".bin", tmp_prefix + ".idx"
    n_docs = n_tokens = n_empty = 0
    pool = builder = None
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        chunks = _chunks(_iter_texts(inputs, json_key), _CHUNK_DOCS)
        if workers > 1:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers, initializer=_worker_init, initargs=(tokenizer_dir,))
            # imap keeps input order, so the output is identical for any number of workers.
            encoded = pool.imap(_worker_encode, chunks, chunksize=1)
        else:
            encoded = (tokenizer.tokenize_batch(texts) for texts in chunks)
        with tqdm(total=n_input_docs, desc="ling-preprocess", unit="doc", disable=not progress) as bar:
            for batch in encoded:
                for ids in batch:
                    if not ids:  # empty text: no sequence (not even a lone EOD)
                        n_empty += 1
                        continue
                    if append_eod:
                        ids = list(ids) + [tokenizer.eod]
                    arr = numpy.asarray(ids, dtype=numpy.int64)
                    builder.add_document(arr, [len(arr)])  # numpy is accepted (no torch copy)
                    n_docs += 1
                    n_tokens += len(arr)
                bar.set_postfix(docs=n_docs, tokens=n_tokens, refresh=False)
                bar.update(len(batch))
        if n_docs == 0:
            raise LingConfigError(f"--input: no non-empty documents under key {json_key!r} in {', '.join(inputs)}")
        builder.finalize(tmp_idx)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        # .idx last: a reader that sees both files sees a complete dataset.
        os.replace(tmp_bin, output_prefix + ".bin")
        os.replace(tmp_idx, output_prefix + ".idx")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if builder is not None and not builder.data_file.closed:
            try:
                builder.data_file.close()
            except OSError:  # a full disk fails the final flush too: still remove the temp files
                pass
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.remove(p)
    return PreprocessResult(output_prefix, n_docs, n_tokens, n_empty, numpy.dtype(dtype).name)
