"""ling-plan hparams: the Ling scaling laws (FACTS §6) reproduced exactly for a given C; the Ling
presets' published values (FACTS §1) next to them; bad input is one line, exit 2."""
from __future__ import annotations

import json
import math

import pytest

from megatron_ling.models.config import get_preset
from megatron_ling.profiling.plan_cli import main
from megatron_ling.scaling import laws as S


def _json(capsys, *argv):
    assert main(["hparams", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("c", [3e17, 1e19, 3e20, 1e22])
def test_hparams_reproduce_the_laws_for_a_given_compute(capsys, c):
    r = _json(capsys, "--compute", str(c))
    assert r["compute"] == c
    assert r["lr_opt"] == 1.1576 * c ** -0.1529
    assert r["batch_opt_tokens"] == 0.0694 * c ** 0.3644
    assert (r["moe_m_opt"], r["moe_d_opt"]) == (0.1915 * c ** 0.5095, 5.2232 * c ** 0.4905)
    assert (r["dense_m_opt"], r["dense_d_opt"]) == (0.0655 * c ** 0.5422, 15.2582 * c ** 0.4578)
    assert r["moe_m_opt"] * r["moe_d_opt"] == pytest.approx(c, rel=1e-3)  # M * D = C
    assert r["in_fitted_range"] == (3e17 <= c <= 3e20)
    mini = get_preset("ling-mini-2.0")
    a, g = (8 + 1) / (256 + 1), 2 * 2048 / 512
    ahat = 1 / (1 / (a + 1 / (1 / 1.63e-2 - 1 / 5.28e16)) + 1 / 5.28e16)
    el = ahat ** (1.23 - 7.61e-2 * math.log10(c) + 1.67e-2 * math.log(g) ** 2 - 1.17e-1 * math.log(g))
    row = r["configs"]["ling-mini-2.0"]
    assert (row["activation_ratio"], row["granularity"]) == (a, g)
    assert row["efficiency_leverage"] == pytest.approx(el, rel=1e-12)
    assert (row["published_lr"], row["published_batch_sequences"]) == (3.36e-4, 4400)
    assert r["configs"]["ling-1t"]["published_lr"] == 1.86e-4
    assert row["m_flops_per_token"] == S.non_embedding_flops_per_token(mini, 4096)


def test_efficiency_leverage_matches_the_papers_example():
    # FACTS §6: EL ≈ 7 at A = 3.1 %, G = 12, C = 1e22 (log10 for C, ln for G)
    assert 6.5 < S.efficiency_leverage(0.031, 12, 1e22) < 7.5


def test_model_and_tokens_give_c_equals_m_times_d(capsys):
    r = _json(capsys, "--preset", "ling-flash-2.0", "--tokens", "20e12", "--seq-length", "4096")
    m = S.non_embedding_flops_per_token(get_preset("ling-flash-2.0"), 4096)
    assert r["compute"] == m * 20e12 and "model" in r["configs"]
    # the law's LR at this C is within the same order as Ling-flash's published 2.61e-4
    assert 1e-4 < r["lr_opt"] < 1e-3


def test_text_output_lists_the_presets(capsys):
    assert main(["hparams", "--compute", "1e20"]) == 0
    out = capsys.readouterr().out
    assert "eta_opt" in out and "ling-flash-2.0" in out and "8,352 seq" in out and "EL at C" in out


@pytest.mark.parametrize("argv,msg", [
    ([], "error: --compute: give a compute budget C"),
    (["--compute", "abc"], "error: --compute: expected a positive number"),
    (["--compute=-1e20"], "error: --compute: expected a positive number"),
    (["--compute", "nan"], "error: --compute: expected a positive number"),
    (["--tokens", "1e12"], "error: --tokens: needs a model"),
    (["--compute", "1e20", "--tokens", "1e12", "--preset", "ling-tiny"], "error: --compute/--tokens: give"),
    (["--compute", "1e20", "--preset", "ling-9t"], "error: model.preset: unknown preset"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, msg):
    assert main(["hparams", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(msg), err


def test_memory_cli_prints_per_rank_table(capsys):
    assert main(["memory", "quickstart", "parallel.tp=1", "parallel.ep=1", "parallel.pp=2", "--world-size", "2",
                 "--json"]) == 0
    ranks = json.loads(capsys.readouterr().out)
    assert [r["pp_rank"] for r in ranks] == [0, 1] and all(r["optimizer_bytes"] == 2 * r["param_bytes"] for r in ranks)
    assert main(["memory", "quickstart", "parallel.tp=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: parallel.tp"), err
