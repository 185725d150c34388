"""ling-preprocess: jsonl text -> Megatron indexed dataset (.bin/.idx). Thin shell over
megatron_ling.data.preprocess.preprocess."""
from __future__ import annotations

import argparse
import sys

from megatron_ling.errors import LingConfigError, cli_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ling-preprocess",
        description="Tokenize jsonl documents into a Megatron indexed dataset (<prefix>.bin/.idx) "
                    "usable in data.paths of a megatron-ling recipe.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE.jsonl",
                   help="one or more jsonl files, one JSON object per line")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", default="builtin", metavar="DIR|builtin",
                   help="local HF tokenizer directory, or 'builtin' for the offline byte-level BPE "
                        "(default: builtin)")
    p.add_argument("--cache-dir", default=None,
                   help="where the built-in tokenizer is cached (default: $MEGATRON_LING_CACHE or "
                        "~/.cache/megatron_ling)")
    p.add_argument("--json-key", default="text", help="field holding the document text (default: text)")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="end every document with the tokenizer's EOD token (default: on; "
                        "--no-append-eod to disable)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--format", choices=("text", "chat"), default="text",
                   help="text: documents under --json-key; chat: {\"messages\": [...]} conversations rendered "
                        "with the tokenizer's chat template, plus an assistant-only loss mask (default: text)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="chat: the training sequence length the conversations must fit")
    p.add_argument("--overlong", choices=("drop", "truncate"), default="drop",
                   help="chat: what to do with a conversation longer than --seq-length (default: drop)")
    p.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.bin/.idx")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_ling.data.preprocess import preprocess

    if args.format == "chat":
        return _main_chat(args)
    res = preprocess(args.input, args.output_prefix, args.tokenizer, json_key=args.json_key,
                     append_eod=args.append_eod, workers=args.workers, force=args.force,
                     progress=not args.no_progress, cache_dir=args.cache_dir)
    print(f"wrote {res.prefix}.bin/.idx: {res.num_documents} documents, {res.num_tokens} tokens, "
          f"dtype {res.dtype}" + (f", {res.num_empty_skipped} empty documents skipped" if res.num_empty_skipped else ""))
    return 0


def _main_chat(args) -> int:
    from megatron_ling.data.chat import preprocess_chat

    for flag, default in (("json_key", "text"), ("append_eod", True), ("workers", 1), ("cache_dir", None)):
        if getattr(args, flag) != default:
            raise LingConfigError(f"--{flag.replace('_', '-')}: not used with --format chat (the chat template "
                                  "decides the text and its end markers); drop it")
    if args.seq_length is None:
        raise LingConfigError("--seq-length: --format chat needs the training sequence length, e.g. --seq-length 4096")
    res = preprocess_chat(args.input, args.output_prefix, args.tokenizer, args.seq_length, args.overlong,
                          force=args.force, progress=not args.no_progress)
    print(f"wrote {res.prefix}.bin/.idx + _loss_mask.bin/.idx: {res.num_written} of {res.num_input} conversations, "
          f"{res.num_tokens} tokens ({res.num_loss_tokens} in the loss), {res.num_truncated} truncated, "
          f"{res.num_dropped} dropped (longer than --seq-length {res.seq_length}, --overlong {res.overlong})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
