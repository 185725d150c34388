"""SFT: chat data with the tokenizer's own template, assistant-only mask, packing exactness (single
process, TP2, PP2), bad input."""
from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys

import numpy
import pytest
import torch

from megatron_ling.data.chat import ChatRenderer, preprocess_chat
from megatron_ling.errors import LingConfigError
from tests.support import sft as S
from tests.support.harness import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 160


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("sft")


@pytest.fixture(scope="module")
def tok(work):
    return S.make_chat_tokenizer(str(work / "tok"))


@pytest.fixture(scope="module")
def renderer(tok):
    return ChatRenderer(tok)


def runs(ids, mask, r):
    """[(bit, decoded text)] of the maximal runs of equal mask bits."""
    out, i = [], 0
    for bit, g in itertools.groupby(mask):
        n = len(list(g))
        out.append((bit, r.hf.decode(ids[i:i + n])))
        i += n
    return out


# ---------------------------------------------------------------------------------------- mask
def test_mask_covers_assistant_content_and_end_marker_only(renderer):
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": "2 + 3 = 5"},
        {"role": "user", "content": "look up lamp"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                             "function": {"name": "lookup", "arguments": "lamp"}}]},
        {"role": "tool", "content": "lamp is 4 letters"},
        {"role": "assistant", "content": "lamp has 4 letters."},
    ]}
    ids, mask = renderer.tokenize(conv)
    assert [t for b, t in runs(ids, mask, renderer) if b] == [
        "2 + 3 = 5<|role_end|>", "<tool_call>lookup(lamp)</tool_call><|role_end|>", "lamp has 4 letters.<|role_end|>"]
    unmasked = "".join(t for b, t in runs(ids, mask, renderer) if not b)
    assert unmasked == ("<role>SYSTEM</role>Be brief.\ndetailed thinking off<|role_end|><role>HUMAN</role>add 2 and 3"
                        "<|role_end|><role>ASSISTANT</role><role>HUMAN</role>look up lamp<|role_end|><role>ASSISTANT"
                        "</role><role>OBSERVATION</role>lamp is 4 letters<|role_end|><role>ASSISTANT</role>")
    # no system message: the template's own "detailed thinking off" system turn, not in the loss
    ids, mask = renderer.tokenize({"messages": conv["messages"][1:3]})
    assert runs(ids, mask, renderer)[0] == (0, "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>"
                                               "add 2 and 3<|role_end|><role>ASSISTANT</role>")


def test_random_conversations_match_the_prefix_rule(renderer):
    rng = random.Random(1)
    hf = renderer.hf
    for _ in range(300):
        conv = S.conversation(rng, max_turns=4)
        msgs = conv["messages"]
        ids, mask = renderer.tokenize(conv)
        full = hf.apply_chat_template(msgs, tokenize=False)
        assert ids == hf(full, add_special_tokens=False)["input_ids"]  # segmenting changed no token
        want = [(1, full[len(hf.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)):
                          len(hf.apply_chat_template(msgs[:i + 1], tokenize=False))])
                for i, m in enumerate(msgs) if m["role"] == "assistant"]
        assert [(b, t) for b, t in runs(ids, mask, renderer) if b] == want
        assert "".join(t for _, t in runs(ids, mask, renderer)) == full


# ---------------------------------------------------------------------------------------- preprocess
@pytest.fixture(scope="module")
def chat_prefix(work, tok):
    src = str(work / "chats.jsonl")
    S.write_conversations(src, 24, seed=5)
    res = preprocess_chat([src], str(work / "chats"), tok, SEQ, progress=False)
    assert res.num_written + res.num_dropped == 24
    return res.prefix


def test_preprocess_writes_tokens_mask_and_counts(work, tok, chat_prefix, renderer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    meta = json.load(open(chat_prefix + ".chat.json"))
    toks, masks = IndexedDataset(chat_prefix), IndexedDataset(chat_prefix + "_loss_mask")
    assert len(toks) == len(masks) == meta["num_written"]
    assert meta["num_tokens"] == int(toks.sequence_lengths.sum())
    assert meta["num_loss_tokens"] == sum(int(masks[i][1:].sum()) for i in range(len(masks)))
    convs = [json.loads(l) for l in open(work / "chats.jsonl")]
    ids, mask = renderer.tokenize(convs[0])
    assert toks[0].tolist() == ids and masks[0].tolist() == mask


def test_overlong_policy_drop_and_truncate(work, tok, capsys):
    from megatron_ling.data.cli import main

    src = str(work / "long.jsonl")
    S.write_conversations(src, 20, seed=9, max_turns=4)
    out = str(work / "long_drop")
    assert main(["--format", "chat", "--input", src, "--output-prefix", out, "--tokenizer", tok,
                 "--seq-length", "60", "--no-progress"]) == 0
    d = json.load(open(out + ".chat.json"))
    assert d["num_dropped"] > 0 and d["num_truncated"] == 0 and d["num_written"] + d["num_dropped"] == 20
    assert f"{d['num_dropped']} dropped" in capsys.readouterr().out
    out = str(work / "long_trunc")
    assert main(["--format", "chat", "--input", src, "--output-prefix", out, "--tokenizer", tok,
                 "--seq-length", "60", "--overlong", "truncate", "--no-progress"]) == 0
    t = json.load(open(out + ".chat.json"))
    assert t["num_truncated"] == d["num_dropped"] and t["num_written"] == 20 - t["num_dropped"]
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(out).sequence_lengths.max() <= 61


BAD = [
    ({"text": "hi"}, "has no 'messages'"),
    ({"messages": [{"role": "human", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "messages[0].role 'human' is unknown"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
     "messages[1] is an empty assistant turn"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}, "has no assistant turn"),
]


@pytest.mark.parametrize("line,expect", BAD)
def test_bad_lines_are_one_error_line_naming_file_and_line(work, tok, line, expect, capsys):
    from megatron_ling.data.cli import main

    src = str(work / "bad.jsonl")
    with open(src, "w") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
        f.write(json.dumps(line) + "\n")
    out = str(work / "bad_out")
    assert main(["--format", "chat", "--input", src, "--output-prefix", out, "--tokenizer", tok,
                 "--seq-length", "64", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --input: ") and f"bad.jsonl:2" in err and expect in err and "\n" not in err
    assert not [f for f in os.listdir(work) if f.startswith("bad_out")]


def test_tokenizer_without_chat_template(work, capsys):
    from megatron_ling.data.cli import main

    bare = S.make_chat_tokenizer(str(work / "tok_bare"), template=None)
    src = str(work / "ok.jsonl")
    S.write_conversations(src, 2, seed=1)
    assert main(["--format", "chat", "--input", src, "--output-prefix", str(work / "bare"), "--tokenizer", bare,
                 "--seq-length", "64", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tokenizer:") and "has no chat template" in err and "\n" not in err


# ---------------------------------------------------------------------------------------- packing
def _compare(out, normalization):
    packed, single = out[True], out[False]
    assert packed["samples"] < single["samples"] and packed["padding"] < single["padding"]
    lp = torch.stack(packed["reports"]["lm loss"]).sum(0)
    ls = torch.stack(single["reports"]["lm loss"]).sum(0)
    assert lp[1] == ls[1] and torch.allclose(lp[0], ls[0], rtol=1e-6, atol=0)
    op = torch.stack(packed["reports"]["sft objective"]).sum(0)
    os_ = torch.stack(single["reports"]["sft objective"]).sum(0)
    assert torch.allclose(op[0] / op[1], os_[0] / os_[1], rtol=1e-6, atol=0)
    per_conv = [r[0] / r[1] for r in single["reports"]["lm loss"]]  # one conversation per micro-batch
    if normalization == "conversation":
        assert torch.allclose(os_[0] / os_[1], torch.stack(per_conv).mean(), rtol=1e-6)  # fp32 weights 1/n_c
        assert os_[1] == len(per_conv)
    else:
        assert torch.allclose(os_[0] / os_[1], ls[0] / ls[1], rtol=1e-9)
    worst = S.grad_rel_diff(packed["grads"], single["grads"])
    assert worst <= 1e-5, worst
    return worst


@pytest.mark.parametrize("parallel,world,normalization,z_loss", [
    (dict(), 1, "token", 0.0), (dict(), 1, "conversation", 0.0), (dict(), 1, "token", 1e-2),
    (dict(tp=2, sp=True), 2, "token", 0.0), (dict(pp=2), 2, "conversation", 0.0),
    (dict(tp=2, sp=True, pp=2), 4, "token", 0.0),
    (dict(pp=2, vpp=2), 2, "conversation", 0.0),
    (dict(ep=2), 2, "token", 1e-2), (dict(distributed_optimizer=True), 2, "token", 0.0)],
    ids=["tp1", "tp1-conv", "tp1-zloss", "tp2sp", "pp2", "tp2sp-pp2", "pp2-vpp2", "ep2-zloss", "dp2-distopt"])
def test_packed_batch_equals_one_conversation_per_sequence(chat_prefix, parallel, world, normalization, z_loss):
    """With z-loss on, the router's z-loss covers the assistant tokens only (training/sft.py), so
    it too is the same packed and unpacked; those cases run without MTP: megatron-core 0.16.1's MTP
    block takes no padding_mask (multi_token_prediction.py; 0.19.2 rolls and passes it), so the MTP
    layer's z-loss still averages every position (docs/sft.md). DP2: each rank runs the whole set
    (grads reduced over DP are then equal on both sides). PP2-VPP2: megatron's interleaved
    schedule, each rank holding two chunks (the chat batch goes through every virtual stage)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = run_ranks(S.packing_rank, world, dict(parallel=parallel, prefix=chat_prefix, seq_length=SEQ,
                                                mbs={"True": 1, "False": 1}, normalization=normalization,
                                                z_loss=z_loss, mtp=not z_loss),
                    timeout_s=600)
    n_conv = len(IndexedDataset(chat_prefix))
    for r in range(world):
        assert out[r]["chunks"] == parallel.get("vpp", 1)
        used = out[r]["conversations"]  # all of them, or under VPP a prefix fitting the schedule
        assert used == n_conv or (parallel.get("vpp", 1) > 1 and used >= n_conv // 2), (used, n_conv)
        print(f"rank {r}: {used} of {n_conv} conversations")
        if out[r][False]["reports"]:
            assert len(out[r][False]["reports"]["lm loss"]) == used
            _compare(out[r], normalization)
        else:  # a pipeline stage without the loss: grads only
            worst = S.grad_rel_diff(out[r][True]["grads"], out[r][False]["grads"])
            assert worst <= 1e-5, worst


def test_thd_sequence_boundaries_are_the_cpu_mask():
    """The GPU path (Transformer Engine, THD) sees the packed micro-batch as the sequences of
    ``packed_seq_params``; attending within each of them causally is exactly the CPU path's
    ``document_attention_mask``, for random doc-id layouts (several samples, runs of one token,
    padding runs). (The THD attention itself needs TE on a GPU: not run here.)"""
    from megatron_ling.training.sft import document_attention_mask, packed_seq_params

    rng = random.Random(3)
    for _ in range(50):
        b, s = rng.randint(1, 3), rng.randint(1, 24)
        doc = torch.tensor([sorted(rng.randint(0, 4) for _ in range(s)) for _ in range(b)])
        p = packed_seq_params(doc)
        cu = p.cu_seqlens_q.tolist()
        assert p.qkv_format == "thd" and cu[0] == 0 and cu[-1] == b * s and cu == p.cu_seqlens_kv.tolist()
        assert p.cu_seqlens_q.dtype == torch.int32 and p.max_seqlen_q == max(y - x for x, y in zip(cu, cu[1:]))
        seq = torch.zeros(b * s, dtype=torch.long)
        for i, (x, y) in enumerate(zip(cu, cu[1:])):
            seq[x:y] = i
        blocked = ~((seq[:, None] == seq[None, :]) & torch.ones(b * s, b * s, dtype=torch.bool).tril())
        cpu = document_attention_mask(doc)  # [b, 1, s, s], per sample
        for j in range(b):
            assert torch.equal(blocked[j * s:(j + 1) * s, j * s:(j + 1) * s], cpu[j, 0]), (doc, cu)
            assert blocked[j * s:(j + 1) * s, :j * s].all()  # never into an earlier sample


# ---------------------------------------------------------------------------------------- end to end
def _cli(*args, timeout=900):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_hf_to_sft_to_hf_end_to_end(work, tok):
    import yaml

    from megatron_ling.models.config import get_preset

    e = work / "e2e"
    e.mkdir()
    cfg = get_preset("ling-tiny", vocab_size=640, num_nextn_predict_layers=0)  # nemo's HF model has no MTP
    hf = S.save_random_hf_model(str(e / "hf"), cfg)
    _cli("-m", "megatron_ling.convert.cli", "from-hf", hf, str(e / "mcore"), "--dtype", "fp32", "--no-progress")
    S.write_conversations(str(e / "train.jsonl"), 300, seed=11)
    S.write_conversations(str(e / "heldout.jsonl"), 12, seed=12)
    for name in ("train", "heldout"):
        _cli("-m", "megatron_ling.data.cli", "--format", "chat", "--input", str(e / f"{name}.jsonl"),
             "--output-prefix", str(e / name), "--tokenizer", tok, "--seq-length", str(SEQ), "--no-progress")
    recipe = {
        "run_dir": str(e / "run"), "model": {"hf_config": hf, "precision": "fp32"},
        "parallel": {"tp": 1, "ep": 1},
        "training": {"train_iters": 30, "micro_batch_size": 4, "global_batch_size": 8, "seq_length": SEQ,
                     "eval_interval": 30, "eval_iters": 1},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0}, "lr": {"schedule": "constant", "warmup_iters": 3},
        "data": {"format": "chat", "paths": [str(e / "train")], "tokenizer": tok, "split": "95,5,0"},
        "checkpoint": {"resume": str(e / "mcore"), "finetune": True},
    }
    (e / "sft.yaml").write_text(yaml.safe_dump(recipe))
    _cli("-m", "megatron_ling.training.cli", "--config", str(e / "sft.yaml"), timeout=1500)
    m = {}
    for d in map(json.loads, open(e / "run" / "metrics.jsonl")):
        m.setdefault(d["iteration"], {}).update(d)  # eval is logged as its own line
    first, last = m[1]["lm_loss"], m[30]["lm_loss"]
    assert last <= 0.7 * first, (first, last)
    assert "eval_lm_loss" in m[30] and m[30]["eval_lm_loss"] < 0.7 * first
    _cli("-m", "megatron_ling.convert.cli", "to-hf", str(e / "run" / "checkpoints"), str(e / "out"),
         "--dtype", "fp32", "--no-progress")
    mega, n_mega, n_samples = run_ranks(S.megatron_assistant_loss_rank, 1,
                                        dict(ckpt_dir=str(e / "run" / "checkpoints"), prefix=str(e / "heldout"),
                                             seq_length=SEQ, pad=0), prepare=False, timeout_s=600)[0]
    ref, n_ref = S.hf_assistant_loss(str(e / "out"), str(e / "heldout"))
    assert n_samples < 12 and n_mega == n_ref  # the megatron side ran packed
    assert abs(mega - ref) <= 1e-5 * ref, (mega, ref)
    assert ref < 0.7 * first


def test_example_recipe_is_valid_at_its_size(work, tok, chat_prefix):
    """examples/sft_ling_mini.yaml, with its paths pointed at local stand-ins of the same shape
    (Ling-mini-2.0's config, a chat prefix, a checkpoint dir), passes every check ling-train runs
    before starting, for world size 16 (2 nodes x 8 GPUs), and refuses a wrong world size."""
    from megatron_ling.models.config import get_preset
    from megatron_ling.training.recipe import load_recipe
    from megatron_ling.training.trainer import preflight

    hf = work / "ling-mini"
    hf.mkdir(exist_ok=True)
    get_preset("ling-mini-2.0").save_hf_config(str(hf / "config.json"))
    (work / "ckpt").mkdir(exist_ok=True)
    ov = [f"model.hf_config={hf}", f"data.paths=[{chat_prefix}]", f"data.tokenizer={tok}",
          f"checkpoint.resume={work / 'ckpt'}", f"run_dir={work / 'run_example'}"]
    recipe = load_recipe(os.path.join(ROOT, "examples", "sft_ling_mini.yaml"), ov)
    ling, data_cfg, _ = preflight(recipe, 16)
    assert ling.num_experts == 256 and data_cfg.format == "chat" and recipe.num_microbatches(16) == 8
    with pytest.raises(LingConfigError, match="parallel.ep"):
        preflight(load_recipe(os.path.join(ROOT, "examples", "sft_ling_mini.yaml"), ov), 12)


@pytest.mark.parametrize("override,field", [
    (["data.format=chat", "data.paths=null"], "data.paths"),
    (["data.packing=false"], "data.packing"),
    (["data.format=chat", "data.loss_normalization=sample"], "data.loss_normalization"),
])
def test_bad_sft_recipe_fields(override, field):
    from megatron_ling.training.recipe import load_recipe

    with pytest.raises(LingConfigError) as e:
        load_recipe("quickstart", override).validate(2)
    # the recipe schema names the section path (recipe.data.x), the data checks the field (data.x)
    assert str(e.value).split(":")[0].endswith(field) and "\n" not in str(e.value)

