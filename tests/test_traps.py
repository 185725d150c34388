"""Known megatron-core 0.16.1 traps become one-line errors (or safe defaults) before any process
group starts -- and each trap is shown to be real: built without megatron-ling's checks, the layout
hangs, crashes obscurely, or silently trains a broken model."""
import pytest

from megatron_ling.errors import LingConfigError
from megatron_ling.parallel.config import ParallelConfig
from megatron_ling.parallel.layout import check_layout
from tests.support.harness import RankFailure, run_ranks
from tests.support import compat_cases as C
from tests.support import fidelity as F
from megatron_ling.training.recipe import recipe_from_dict

SC = F.case(steps=1)


def _recipe(parallel: dict):
    return recipe_from_dict(dict(model=dict(preset="ling-tiny"), parallel=parallel,
                                 training=dict(global_batch_size=8, micro_batch_size=1, seq_length=32)))


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------- MTP on a non-last pipeline stage
MTP_NOT_LAST_CHUNK = "Et|t|t|tm||||L"  # pp=4, vpp=2: MTP in rank 3's first virtual stage
MTP_STANDALONE_VPP = "Et|t|t||t||m|L"  # pp=4, vpp=2: MTP on rank 2's last virtual stage, loss on rank 3


def test_mtp_outside_the_last_virtual_stage_of_its_rank_is_refused():
    with pytest.raises(LingConfigError, match=r"parallel.pipeline_layout: with vpp=2, MTP must be in the last "
                                              r"virtual stage of its pipeline rank") as e:
        check_layout(MTP_NOT_LAST_CHUNK, pp=4, num_layers=4, mtp_layers=1, vpp=2)
    _one_line(e)
    # rank 0's last virtual stage: a second word-embedding copy on rank 0, never summed with stage 0's
    with pytest.raises(LingConfigError, match=r"with vpp=2, MTP must not be on pipeline rank 0") as e:
        check_layout("Ett|t|tm|L", pp=2, num_layers=4, mtp_layers=1, vpp=2)
    _one_line(e)
    with pytest.raises(LingConfigError, match="MTP must be in the last virtual stage"):
        _recipe(dict(pp=4, vpp=2, pipeline_layout=MTP_NOT_LAST_CHUNK)).validate(world_size=4)
    # MTP on its own (last) virtual stage, with the loss, or standalone without VPP: accepted
    _recipe(dict(pp=4, vpp=2, pipeline_layout=MTP_STANDALONE_VPP)).validate(world_size=4)
    _recipe(dict(pp=2, vpp=2, pipeline_layout="Ett|t||tmL")).validate(world_size=2)
    _recipe(dict(pp=3, pipeline_layout="Ett|ttm|L")).validate(world_size=3)
    with pytest.raises(LingConfigError, match="MTP layers must come after every decoder layer"):
        check_layout("Ett|tmt|L", pp=3, num_layers=4, mtp_layers=1)


def test_mtp_standalone_with_megatron_default_embedding_group_silently_diverges():
    """Why ``init_model_parallel`` passes ``get_embedding_ranks``: megatron-core's default embedding
    group is the first and last pp rank. The standalone MTP stage's embedding copy is left out (its
    gradient is never summed with the first stage's: finalize_model_grads.py:258), and the untied last
    stage is let in (its output-layer weight and gradient are summed into the word embedding's,
    language_module.py:245). Nothing hangs or errs: after one step the two copies of the word
    embedding differ (caught when gathering the weights)."""
    ref = F.reference(SC)
    with pytest.raises(RankFailure, match=r"ReplicaMismatch: embedding\.word_embeddings\.weight"):
        run_ranks(C.layout_run_default_embedding_group, 3,
                  dict(recipe=SC, parallel=dict(pp=3, pipeline_layout="Ett|ttm|L"), full0=ref["full0"]),
                  timeout_s=90, grace_s=3)


# ----------------------------------------------- VPP with both first/last stage counts at PP=2
VPP_FIRST_LAST = dict(pp=2, vpp=2, num_layers_in_first_pipeline_stage=2, num_layers_in_last_pipeline_stage=2)


def test_vpp_first_and_last_counts_at_pp2_are_refused():
    with pytest.raises(LingConfigError, match="use a layout string|pipeline_layout string") as e:
        ParallelConfig(**VPP_FIRST_LAST).validate(2)
    _one_line(e)
    with pytest.raises(LingConfigError, match="pipeline_layout"):
        _recipe(VPP_FIRST_LAST).validate(world_size=2)


def test_vpp_first_and_last_counts_at_pp2_crash_megatron_core():
    with pytest.raises(RankFailure, match="ZeroDivisionError"):
        run_ranks(C.build_only, 2, dict(recipe=SC, parallel=VPP_FIRST_LAST), timeout_s=60, grace_s=3)


# ---------------------------------------------------------------- TP>1 with EP=1 and ETP=1
def test_tp_with_ep1_etp1_is_refused_and_etp_defaults_to_tp():
    with pytest.raises(LingConfigError, match=r"parallel.etp: .*never reduces expert gradients") as e:
        ParallelConfig(tp=2, ep=1, etp=1).validate(2)
    _one_line(e)
    assert ParallelConfig(tp=2).expert_tp == 2  # the default is safe
    ParallelConfig(tp=2, ep=2, etp=1).validate(2)  # ETP=1 is fine once experts are EP-sharded


def test_tp_with_ep1_etp1_silently_diverges_in_megatron_core():
    """Built anyway on megatron-core 0.16, the TP ranks' replicated experts get different gradients
    that are never all-reduced: after one step the replicas differ (caught when gathering the
    weights). 0.19 keeps the replicas equal; megatron-ling refuses the layout on every version (one
    rule, and ETP=TP is what Megatron-LM recommends)."""
    from megatron_ling import compat

    ref = F.reference(SC)

    def run():
        return run_ranks(F.layout_run, 2, dict(recipe=SC, parallel=dict(tp=2, etp=1), full0=ref["full0"],
                                               checks=False), timeout_s=90, grace_s=3)

    if compat.mcore_at_least("0.19"):
        run()  # no ReplicaMismatch
        return
    with pytest.raises(RankFailure, match=r"ReplicaMismatch: decoder\.layers\.\d+\.mlp\.experts"):
        run()


# ------------------------------------------------------------------- MoE + TP without SP
def test_moe_tp_without_sp_is_refused_and_sp_defaults_on():
    with pytest.raises(LingConfigError, match=r"parallel.sp: MoE training with tp=2 requires sequence") as e:
        ParallelConfig(tp=2, sp=False).validate(2)
    _one_line(e)
    assert ParallelConfig(tp=2).sequence_parallel is True
    assert ParallelConfig(tp=1).sequence_parallel is False


def test_moe_tp_without_sp_fails_at_the_first_step_in_megatron_core():
    ref = F.reference(SC)
    with pytest.raises(RankFailure, match="MoE and tensor parallelism"):
        run_ranks(F.layout_run, 2, dict(recipe=SC, parallel=dict(tp=2, sp=False), full0=ref["full0"],
                                        checks=False), timeout_s=90, grace_s=3)
