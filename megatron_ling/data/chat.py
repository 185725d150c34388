"""Chat (SFT) data: conversations -> tokens + assistant loss mask, rendered with the tokenizer's own
chat template, stored as two megatron-core indexed datasets.

Input: JSON Lines, one conversation a line, ``{"messages": [{"role": ..., "content": ...}, ...]}``
(roles system / user / assistant / tool; an assistant turn may carry ``tool_calls``; an optional
top-level ``tools`` list is handed to the template).

Mask rule (by rendering prefixes, never by searching for marker strings): for assistant turn i,
``P_i = render(messages[:i], add_generation_prompt=True)`` ends with the assistant header and
``Q_i = render(messages[:i + 1])`` ends after the turn's content and its end marker. The characters
``[len(P_i), len(Q_i))`` of the full rendering are in the loss, nothing else. Both renderings must be
prefixes of the full rendering (true for every append-only template, Ling's included); a template
that is not is refused. Tokens are made segment by segment (text between the boundaries tokenized
on its own), so a token never straddles a masked/unmasked boundary.

Output of ``preprocess_chat``: ``PREFIX.bin/.idx`` (token ids, one document per conversation),
``PREFIX_loss_mask.bin/.idx`` (uint8, 1 where the token is predicted in the loss) and
``PREFIX.chat.json`` (counts, seq_length, overlong policy, tokenizer identity), all written to
temporary names and renamed when complete, the .json last.

Overlong policy (a conversation with more than ``seq_length + 1`` tokens cannot be one sample):
``drop`` (default) leaves it out; ``truncate`` keeps its first ``seq_length + 1`` tokens (and is then
dropped anyway if no assistant token survives). Both are counted and reported.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy

from megatron_ling.errors import LingConfigError

ROLES = ("system", "user", "assistant", "tool")
OVERLONG_POLICIES = ("drop", "truncate")
MASK_SUFFIX = "_loss_mask"
META_SUFFIX = ".chat.json"


# ----------------------------------------------------------------------------------- input
def check_conversation(obj: Any, where: str) -> dict:
    """Validate one parsed line; raise LingConfigError naming ``where`` (file:line) and the field."""
    if not isinstance(obj, dict) or "messages" not in obj:
        keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise LingConfigError(f"--input: {where} has no 'messages' (found: {keys}); each line must be "
                              '{"messages": [{"role": "user", "content": ...}, ...]}')
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise LingConfigError(f"--input: {where}: 'messages' must be a non-empty list of turns")
    n_assistant = 0
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise LingConfigError(f"--input: {where}: messages[{j}] has no 'role'; each turn is "
                                  '{"role": ..., "content": ...}')
        role = m["role"]
        if role not in ROLES:
            raise LingConfigError(f"--input: {where}: messages[{j}].role {role!r} is unknown; use one of "
                                  f"{', '.join(ROLES)}")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise LingConfigError(f"--input: {where}: messages[{j}].content must be a string")
        if role == "assistant":
            n_assistant += 1
            if not (content or "").strip() and not m.get("tool_calls"):
                raise LingConfigError(f"--input: {where}: messages[{j}] is an empty assistant turn (no content, "
                                      "no tool_calls); remove the line or fill in the turn")
    if n_assistant == 0:
        raise LingConfigError(f"--input: {where}: the conversation has no assistant turn, so nothing would be "
                              "trained; add one or remove the line")
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise LingConfigError(f"--input: {where}: 'tools' must be a list of tool definitions")
    return obj


def iter_conversations(inputs: list[str]) -> Iterator[dict]:
    """Parsed, validated conversations of the jsonl ``inputs`` (blank lines skipped)."""
    for path in inputs:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise LingConfigError(f"--input: {where}: not UTF-8 ({e.reason}); re-encode the file") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LingConfigError(f"--input: {where}: invalid JSON ({e.msg} at column {e.colno})") from None
                yield check_conversation(obj, where)


# ----------------------------------------------------------------------------------- rendering
class ChatRenderer:
    """The tokenizer directory's own chat template (through transformers' apply_chat_template)."""

    def __init__(self, tokenizer_dir: str, field: str = "--tokenizer"):
        try:
            from transformers import AutoTokenizer
        except ImportError:  # pragma: no cover - depends on the install
            raise LingConfigError(f"{field}: chat data needs transformers to render the chat template; "
                                  "pip install 'megatron-ling[hf]'") from None
        self.hf = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        if not getattr(self.hf, "chat_template", None):
            raise LingConfigError(f"{field}: the tokenizer at {tokenizer_dir!r} has no chat template "
                                  "(chat_template in tokenizer_config.json or chat_template.jinja); use the "
                                  "model's own tokenizer directory, which ships one")
        tpl = self.hf.chat_template
        self.template_sha = hashlib.sha256((tpl if isinstance(tpl, str) else json.dumps(tpl)).encode()).hexdigest()

    def render(self, messages: list, tools: list | None, generation_prompt: bool) -> str:
        return self.hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                           add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"] if text else []

    def assistant_spans(self, conv: dict) -> tuple[str, list[tuple[int, int]]]:
        """(full rendering, character spans of every assistant turn's content + end marker)."""
        msgs, tools = conv["messages"], conv.get("tools")
        full = self.render(msgs, tools, False)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            p = self.render(msgs[:i], tools, True) if i else _generation_prefix(self, tools)
            q = self.render(msgs[: i + 1], tools, False)
            if not full.startswith(p) or not full.startswith(q) or len(q) <= len(p):
                raise LingConfigError("--tokenizer: the chat template does not render conversations append-only "
                                      f"(turn {i}); the assistant mask cannot be derived from prefixes")
            spans.append((len(p), len(q)))
        return full, spans

    def tokenize(self, conv: dict) -> tuple[list[int], list[int]]:
        """(token ids, loss mask): mask[k] = 1 iff token k lies in an assistant span."""
        full, spans = self.assistant_spans(conv)
        ids: list[int] = []
        mask: list[int] = []
        pos = 0
        for a, b in spans:
            for seg, bit in ((full[pos:a], 0), (full[a:b], 1)):
                t = self.encode(seg)
                ids += t
                mask += [bit] * len(t)
            pos = b
        t = self.encode(full[pos:])
        return ids + t, mask + [0] * len(t)


def _generation_prefix(r: ChatRenderer, tools) -> str:
    """Rendering of an empty history with the generation prompt (what precedes a first assistant turn)."""
    try:
        return r.render([], tools, True)
    except Exception:  # templates may refuse an empty history
        return ""


# ----------------------------------------------------------------------------------- preprocess
@dataclass(frozen=True)
class ChatPreprocessResult:
    prefix: str
    num_input: int
    num_written: int
    num_truncated: int
    num_dropped: int
    num_tokens: int
    num_loss_tokens: int
    seq_length: int
    overlong: str
    dtype: str


def mask_prefix(prefix: str) -> str:
    return prefix + MASK_SUFFIX


def read_meta(prefix: str, field: str = "data.paths") -> dict:
    path = prefix + META_SUFFIX
    if not os.path.isfile(path):
        raise LingConfigError(f"{field}: {prefix!r} is not chat data ({path} missing); create it with "
                              f"`ling-preprocess --format chat --input chats.jsonl --output-prefix {prefix} ...`")
    with open(path) as f:
        return json.load(f)


def preprocess_chat(inputs: list[str], output_prefix: str, tokenizer: str, seq_length: int,
                    overlong: str = "drop", force: bool = False, progress: bool = True) -> ChatPreprocessResult:
    """Render and tokenize jsonl conversations into PREFIX{,_loss_mask}.bin/.idx + PREFIX.chat.json.

    Every line is validated before anything is written; the tokenizer must have a chat template.
    ``seq_length``: the training sequence length the data is meant for (a sample holds
    ``seq_length + 1`` tokens: inputs and shifted labels).
    """
    from megatron_ling.data.config import BUILTIN_TOKENIZER, _check_tokenizer_dir
    from megatron_ling.data.preprocess import check_output_prefix, token_dtype
    from megatron_ling.data.tokenizer import load_tokenizer

    if not inputs:
        raise LingConfigError("--input: give at least one .jsonl file")
    for p in inputs:
        if not os.path.isfile(p):
            raise LingConfigError(f"--input: {p} does not exist or is not a file")
    if tokenizer in (None, BUILTIN_TOKENIZER):
        raise LingConfigError("--tokenizer: chat data needs the model's tokenizer directory (with its chat "
                              "template); the built-in tokenizer has none")
    _check_tokenizer_dir(tokenizer, "--tokenizer")
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 2:
        raise LingConfigError(f"--seq-length: expected the training sequence length (an integer >= 2), got {seq_length!r}")
    if overlong not in OVERLONG_POLICIES:
        raise LingConfigError(f"--overlong: must be one of {', '.join(OVERLONG_POLICIES)}, got {overlong!r}")
    check_output_prefix(output_prefix, force)
    check_output_prefix(mask_prefix(output_prefix), force)
    n_input = sum(1 for _ in iter_conversations(inputs))  # every line checked before any work
    if n_input == 0:
        raise LingConfigError(f"--input: no conversations in {', '.join(inputs)}")
    renderer = ChatRenderer(tokenizer)
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp = f"{output_prefix}.tmp{os.getpid()}"
    tmp_mask = mask_prefix(tmp)
    tmp_files = [tmp + ".bin", tmp + ".idx", tmp_mask + ".bin", tmp_mask + ".idx", tmp + META_SUFFIX]
    limit = seq_length + 1
    n_written = n_trunc = n_drop = n_tokens = n_loss = 0
    builders = []
    try:
        tb = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        mb = IndexedDatasetBuilder(tmp_mask + ".bin", dtype=numpy.uint8)
        builders = [tb, mb]
        with tqdm(total=n_input, desc="ling-preprocess chat", unit="conv", disable=not progress) as bar:
            for conv in iter_conversations(inputs):
                ids, mask = renderer.tokenize(conv)
                bar.update(1)
                if len(ids) > limit:
                    if overlong == "drop":
                        n_drop += 1
                        continue
                    ids, mask = ids[:limit], mask[:limit]
                    n_trunc += 1
                    if not any(mask[1:]):  # no assistant token left to predict
                        n_drop += 1
                        continue
                tb.add_document(numpy.asarray(ids, dtype=numpy.int64), [len(ids)])
                mb.add_document(numpy.asarray(mask, dtype=numpy.int64), [len(mask)])
                n_written += 1
                n_tokens += len(ids)
                n_loss += int(sum(mask[1:]))  # the first token is never a label
                bar.set_postfix(written=n_written, dropped=n_drop, truncated=n_trunc, refresh=False)
        if n_written == 0:
            raise LingConfigError(f"--seq-length: every conversation is longer than {seq_length} tokens and was "
                                  "dropped; raise --seq-length or use --overlong truncate")
        tb.finalize(tmp + ".idx")
        mb.finalize(tmp_mask + ".idx")
        res = ChatPreprocessResult(output_prefix, n_input, n_written, n_trunc, n_drop, n_tokens, n_loss,
                                   seq_length, overlong, numpy.dtype(dtype).name)
        with open(tmp + META_SUFFIX, "w") as f:
            json.dump({**asdict(res), "format": "chat", "tokenizer": tok.unique_identifiers,
                       "chat_template_sha256": renderer.template_sha}, f, indent=2)
        for ext in (".bin", ".idx"):
            os.replace(tmp + ext, output_prefix + ext)
            os.replace(tmp_mask + ext, mask_prefix(output_prefix) + ext)
        os.replace(tmp + META_SUFFIX, output_prefix + META_SUFFIX)  # last: marks the set complete
    finally:
        for b in builders:
            if not b.data_file.closed:
                b.data_file.close()
        for p in tmp_files:
            if os.path.exists(p):
                os.remove(p)
    return res
