"""Bad input over the other CLIs (ling-convert, ling-preprocess, ling-merge, ling-slurm,
ling-bubbles, ling-params): each case exits 2 with exactly one ``error:`` line naming the field
or argument, and leaves nothing behind in the user's directory (``test_bad_input.py`` has the
ling-train / ling-plan cases and the rules, shared here)."""
from __future__ import annotations

import json
import os

import pytest

from megatron_ling.convert import cli as convert_cli
from megatron_ling.data import cli as data_cli
from megatron_ling.launch import cli as slurm_cli
from megatron_ling.merge import cli as merge_cli
from megatron_ling.models import cli as params_cli
from megatron_ling.profiling import bubbles_cli
from tests.test_bad_input import assert_one_line, call, launcher_free_env, work  # noqa: F401  (fixtures)


def _more_files(w):
    """User files these CLIs read, next to test_bad_input's ``work`` ones."""
    (w / "ok.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    (w / "broken.jsonl").write_text("{\"text\": \"a\"}\n{not json\n")
    (w / "latin1.jsonl").write_bytes("{\"text\": \"caf\xe9\"}\n".encode("latin-1"))
    (w / "no_messages.jsonl").write_text(json.dumps({"text": "a plain document"}) + "\n")
    (w / "ckpts").mkdir()
    (w / "ckpts" / "latest_checkpointed_iteration.txt").write_text("ten\n")


# (CLI main, argv with {w} for the work dir, text the error line must contain)
CASES = {
    "to_hf_not_a_checkpoint": (convert_cli, ["to-hf", "{w}/a_dir", "{w}/out"], "a_dir"),
    "to_hf_input_is_a_file": (convert_cli, ["to-hf", "{w}/a_file", "{w}/out"], "a_file"),
    "to_hf_tracker_text": (convert_cli, ["to-hf", "{w}/ckpts", "{w}/out"], "tracker"),
    "to_hf_dtype": (convert_cli, ["to-hf", "{w}/a_dir", "{w}/out", "--dtype", "int8"], "--dtype"),
    "to_hf_shard_size": (convert_cli, ["to-hf", "{w}/a_dir", "{w}/out", "--shard-size", "0"], "--shard-size"),
    "from_hf_malformed_config": (convert_cli, ["from-hf", "{w}/hf_malformed", "{w}/out"], "config.json"),
    "from_hf_list_config": (convert_cli, ["from-hf", "{w}/hf_list", "{w}/out"], "config.json"),
    "from_hf_unknown_field": (convert_cli, ["from-hf", "{w}/hf_unknown", "{w}/out"], "use_sliding_window"),
    "from_hf_dropout": (convert_cli, ["from-hf", "{w}/hf_dropout", "{w}/out"], "attention_dropout"),
    "from_hf_no_config": (convert_cli, ["from-hf", "{w}/a_dir", "{w}/out"], "config.json"),
    "from_hf_output_exists": (convert_cli, ["from-hf", "{w}/hf_malformed", "{w}/a_dir"], "a_dir"),
    "from_hf_file_size": (convert_cli, ["from-hf", "{w}/hf_unknown", "{w}/out", "--file-size", "0"], "--file-size"),
    "verify_unknown_hf_field": (convert_cli, ["verify", "{w}/a_dir", "{w}/hf_unknown"], "use_sliding_window"),
    "verify_seq_len": (convert_cli, ["verify", "{w}/a_dir", "{w}/hf_unknown", "--seq-len", "0"], "--seq-len"),
    "preprocess_missing_input": (data_cli, ["--input", "{w}/missing.jsonl", "--output-prefix", "{w}/o"], "missing.jsonl"),
    "preprocess_input_is_a_dir": (data_cli, ["--input", "{w}/a_dir", "--output-prefix", "{w}/o"], "a_dir"),
    "preprocess_broken_json": (data_cli, ["--input", "{w}/broken.jsonl", "--output-prefix", "{w}/o"], "broken.jsonl"),
    "preprocess_non_utf8": (data_cli, ["--input", "{w}/latin1.jsonl", "--output-prefix", "{w}/o"], "latin1.jsonl"),
    "preprocess_bad_tokenizer": (data_cli, ["--input", "{w}/ok.jsonl", "--output-prefix", "{w}/o", "--tokenizer",
                                            "{w}/tok_malformed"], "tok_malformed"),
    "preprocess_output_under_a_file": (data_cli, ["--input", "{w}/ok.jsonl", "--output-prefix", "{w}/a_file/o"],
                                       "--output-prefix"),
    "preprocess_chat_without_messages": (data_cli, ["--input", "{w}/no_messages.jsonl", "--output-prefix", "{w}/o",
                                                    "--format", "chat", "--tokenizer", "{w}/tok_not_tokenizer"],
                                         "--"),
    "merge_not_a_checkpoint": (merge_cli, ["{w}/a_dir", "--out", "{w}/m"], "a_dir"),
    "merge_last_zero": (merge_cli, ["{w}/a_dir", "--out", "{w}/m", "--last", "0"], "--last"),
    "slurm_submit_broken_recipe": (slurm_cli, ["submit", "{w}/bad.yaml", "--dry-run"], "bad.yaml"),
    "slurm_submit_nodes": (slurm_cli, ["submit", "quickstart", "--nodes", "0", "--dry-run"], "--nodes"),
    "slurm_submit_bad_override": (slurm_cli, ["submit", "quickstart", "training.train_iters=abc", "--dry-run"],
                                  "training.train_iters"),
    "slurm_resubmit_not_a_run": (slurm_cli, ["resubmit", "{w}/a_dir"], "a_dir"),
    "bubbles_not_a_run": (bubbles_cli, ["report", "{w}/a_dir"], "a_dir"),
    "params_bad_preset": (params_cli, ["--preset", "ling-2t"], "ling-2t"),
    "params_malformed_config": (params_cli, ["--hf-config", "{w}/hf_malformed"], "config.json"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_bad_input(work, capfd, name):
    cli, argv, field = CASES[name]
    _more_files(work)
    before = sorted(os.listdir(work))
    rc = call(cli.main, [a.replace("{w}", str(work)) for a in argv])
    assert_one_line(rc, *capfd.readouterr(), field, work, before)
