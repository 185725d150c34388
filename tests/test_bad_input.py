"""Bad input over the CLIs: each case exits 2 with exactly one ``error:`` line that names the
field, before any process group starts, and leaves no partial output behind.

Every case calls the CLI's ``main(argv)`` in this process (the console scripts are ``main`` and
nothing else, so exit status and output are the same; one torch/megatron import for all cases).
``test_console_script`` repeats a few of them through the installed ``ling-train`` / ``ling-plan``
executables to prove that path: the entry point, argparse's own exit and a fresh interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_ling.models.config import get_preset
from megatron_ling.profiling import plan_cli
from megatron_ling.training import cli as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's console scripts, on PATH or not


def call(main, argv) -> int:
    """``main(argv)`` as the console script runs it: its return value, or argparse's exit status."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def assert_one_line(rc, out, err, field, cwd, before):
    lines = (out + err).splitlines()
    errors = [ln for ln in lines if ln.startswith("error:") or ": error:" in ln]
    assert rc == 2, (rc, err[-1500:])
    assert len(errors) == 1, err[-1500:]
    assert "Traceback" not in err, err[-1500:]
    assert field in errors[0], errors[0]
    assert sorted(os.listdir(cwd)) == before, "partial output left behind"


@pytest.fixture(autouse=True)
def launcher_free_env(monkeypatch):
    """A user's shell: not inside a torchrun rank (main reads RANK / WORLD_SIZE)."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A directory holding the user's files, and the working directory (nothing else may appear in it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a directory\n")
    (tmp_path / "latin1.yaml").write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    (tmp_path / "bad.yaml").write_text("training: {train_iters: [1,\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "a_dir").mkdir()
    tiny = get_preset("ling-tiny").to_hf_dict()
    for name, content in {
        "hf_malformed": b"{\"hidden_size\": 64,,}",
        "hf_latin1": json.dumps(dict(tiny, eos_token_id=0)).replace("}", ", \"note\": \"\xe9\"}").encode("latin-1"),
        "hf_list": b"[1, 2, 3]",
        "hf_unknown": json.dumps(dict(tiny, use_sliding_window=True)).encode(),
        "hf_dropout": json.dumps(dict(tiny, attention_dropout=0.1)).encode(),
        "hf_shared": json.dumps(dict(tiny, moe_shared_expert_intermediate_size=7)).encode(),
        "hf_linear_rope": json.dumps(dict(tiny, rope_scaling={"type": "linear", "factor": 2.0})).encode(),
        "hf_eps_text": json.dumps(dict(tiny, rms_norm_eps="abc")).encode(),
        "hf_norm_topk": json.dumps(dict(tiny, norm_topk_prob=False)).encode(),
    }.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_bytes(content)
    for name, files in {
        "tok_malformed": {"tokenizer.json": b"{oops"},
        "tok_latin1": {"tokenizer.json": "{\"x\": \"\xe9\"}".encode("latin-1")},
        "tok_list_cfg": {"tokenizer_config.json": b"[1]", "tokenizer.json": b"{}"},
        "tok_not_tokenizer": {"tokenizer.json": b"{\"a\": 1}"},
    }.items():
        d = tmp_path / name
        d.mkdir()
        for f, b in files.items():
            (d / f).write_bytes(b)
    return tmp_path


# (overrides after --config quickstart, field named in the error)
RECIPE_CASES = [
    (["model.overrides.rms_norm_eps=abc"], "model.overrides.rms_norm_eps"),
    (["model.overrides.rope_theta=abc"], "model.overrides.rope_theta"),
    (["model.overrides.rms_norm_eps=-1"], "model.rms_norm_eps"),
    (["model.overrides.hidden_size=[1]"], "model.overrides.hidden_size"),
    (["model.overrides.no_such_field=1"], "model.overrides.no_such_field"),
    (["model.overrides.rope_scaling={type: linear, factor: 2}"], "model.rope_scaling"),
    (["model.overrides.rope_scaling={type: yarn, factor: 4, low_freq_factor: 1}"], "model.rope_scaling.low_freq_factor"),
    (["model.overrides.norm_topk_prob=false"], "model.norm_topk_prob"),
    (["lr.decay_iters=-5"], "lr.decay_iters"),
    (["lr.warmup_iters=-1"], "lr.warmup_iters"),
    (["lr.schedule=exp"], "lr.schedule"),
    (["lr.wsd_decay_style=square"], "lr.wsd_decay_style"),
    (["optimizer.clip_grad=-1"], "optimizer.clip_grad"),
    (["optimizer.lr=.nan"], "optimizer.lr"),
    (["optimizer.lr=nan"], "optimizer.lr"),
    (["optimizer.lr=.inf"], "optimizer.lr"),
    (["optimizer.adam_beta1=1.0"], "optimizer.adam_beta1"),
    (["optimizer.adam_beta2=1.5"], "optimizer.adam_beta2"),
    (["optimizer.adam_eps=0"], "optimizer.adam_eps"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay"),
    (["training.eval_interval=-1"], "training.eval_interval"),
    (["training.eval_iters=0"], "training.eval_iters"),
    (["training.train_iters=abc"], "training.train_iters"),
    (["training.micro_batch_size=1.5"], "training.micro_batch_size"),
    (["training.seq_length=0"], "training.seq_length"),
    (["profiling.steps=abc"], "profiling.steps"),
    (["profiling.steps=[0]"], "profiling.steps"),
    (["logging.log_interval=0"], "logging.log_interval"),
    (["checkpoint.interval=-3"], "checkpoint.interval"),
    (["checkpoint.keep_last=-1"], "checkpoint.keep_last"),
    (["parallel.tp=0"], "parallel.tp"),
    (["parallel.vpp=-2"], "parallel.vpp"),
    (["parallel.moe_token_dispatcher=magic"], "parallel.moe_token_dispatcher"),
    (["parallel.tp=1", "parallel.ep=1", "parallel.pp=2", "parallel.pipeline_layout=Et*999999999999|tmL"], "parallel.pipeline_layout"),
    (["parallel.tp=1", "parallel.ep=1", "parallel.pp=2", "parallel.pipeline_layout=(Et|)*99999999999"], "parallel.pipeline_layout"),
    (["model.precision=fp64"], "model.precision"),
    (["model.z_loss_coeff=-1"], "model.z_loss_coeff"),
    (["model.seed=-1"], "model.seed"),
    (["model.init_std=0"], "model.init_std"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["run_dir={work}/a_file/run"], "run_dir"),
    (["run_dir={work}/a_file"], "run_dir"),
    (["checkpoint.dir={work}/a_file/ckpt"], "checkpoint.dir"),
    (["logging.metrics_file={work}/a_dir"], "logging.metrics_file"),
    (["profiling.dir={work}/a_file/x"], "profiling.dir"),
    (["model.hf_config={work}/hf_malformed"], "config.json"),
    (["model.hf_config={work}/hf_latin1"], "UTF-8"),
    (["model.hf_config={work}/hf_list"], "config.json"),
    (["model.hf_config={work}/hf_unknown"], "use_sliding_window"),
    (["model.hf_config={work}/hf_dropout"], "attention_dropout"),
    (["model.hf_config={work}/hf_shared"], "moe_shared_expert_intermediate_size"),
    (["model.hf_config={work}/hf_linear_rope"], "model.rope_scaling"),
    (["model.hf_config={work}/hf_eps_text"], "rms_norm_eps"),
    (["model.hf_config={work}/hf_norm_topk"], "model.norm_topk_prob"),
    (["model.hf_config={work}/a_dir"], "config.json"),
    (["data.tokenizer={work}/tok_malformed"], "data.tokenizer"),
    (["data.tokenizer={work}/tok_latin1"], "data.tokenizer"),
    (["data.tokenizer={work}/tok_list_cfg"], "data.tokenizer"),
    (["data.tokenizer={work}/tok_not_tokenizer"], "data.tokenizer"),
]


def recipe_argv(work, overrides) -> list:
    over = [o.replace("{work}", str(work)) for o in overrides]
    return ["--config", "quickstart", "--check", "--nproc-per-node", "2", f"run_dir={work}/run", *over]


@pytest.mark.parametrize("overrides, field", RECIPE_CASES, ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_recipe_field(work, capfd, overrides, field):
    before = sorted(os.listdir(work))
    rc = call(train_cli.main, recipe_argv(work, overrides))
    assert_one_line(rc, *capfd.readouterr(), field, work, before)


RECIPE_FILE_CASES = [
    ("latin1.yaml", "--config"),
    ("bad.yaml", "--config"),
    ("list.yaml", "--config"),
    ("a_dir", "--config"),
    ("missing.yaml", "--config"),
]


@pytest.mark.parametrize("config, field", RECIPE_FILE_CASES)
def test_recipe_file(work, capfd, config, field):
    before = sorted(os.listdir(work))
    rc = call(train_cli.main, ["--config", str(work / config), "--check"])
    assert_one_line(rc, *capfd.readouterr(), field, work, before)


PLAN_CASES = [
    (["measure", "--preset", "ling-tiny", "--pp", "0", "--layouts", "Et|tttmL", "--micro-batches", "4",
      "--out", "out"], "--pp"),
    (["measure", "--preset", "ling-tiny", "--pp", "2", "--layouts", "Et|tttmL", "--micro-batches", "-1",
      "--out", "out"], "--micro-batches"),
    (["layout", "--preset", "ling-tiny", "--pp", "x", "--micro-batches", "4"], "--pp"),
    (["layout", "--preset", "ling-tiny", "--pp", "2", "--micro-batches", "4", "--evaluate", "Et*999999999999|tmL"],
     "parallel.pipeline_layout"),
]


@pytest.mark.parametrize("argv, field", PLAN_CASES)
def test_plan_cli(work, capfd, argv, field):
    before = sorted(os.listdir(work))
    rc = call(plan_cli.main, argv)
    assert_one_line(rc, *capfd.readouterr(), field, work, before)


def case(cases, text):
    """The entry of ``cases`` whose space-joined arguments contain ``text``."""
    return next(c for c in cases if text in " ".join(c[0]))


# (script, argv for the work dir, field): one per failure path that differs outside this process
_FIELD, _LAYOUT = case(RECIPE_CASES, "rms_norm_eps=abc"), case(RECIPE_CASES, "Et*999999999999")
_PP0, _EVAL = case(PLAN_CASES, "--pp 0"), case(PLAN_CASES, "--evaluate")
CONSOLE_CASES = {
    "train_field": ("ling-train", lambda w: recipe_argv(w, _FIELD[0]), _FIELD[1]),
    "train_layout_memory": ("ling-train", lambda w: recipe_argv(w, _LAYOUT[0]), _LAYOUT[1]),
    "train_non_utf8_recipe": ("ling-train", lambda w: ["--config", str(w / "latin1.yaml"), "--check"], "--config"),
    "plan_argparse_range": ("ling-plan", lambda w: _PP0[0], _PP0[1]),
    "plan_layout_memory": ("ling-plan", lambda w: _EVAL[0], _EVAL[1]),
}


@pytest.mark.parametrize("case", list(CONSOLE_CASES))
def test_console_script(work, case):
    script, argv, field = CONSOLE_CASES[case]
    before = sorted(os.listdir(work))
    r = subprocess.run([os.path.join(BIN, script), *argv(work)], capture_output=True, text=True, timeout=300,
                       cwd=work, env=dict(os.environ, PYTHONPATH=ROOT))
    assert_one_line(r.returncode, r.stdout, r.stderr, field, work, before)
