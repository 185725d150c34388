"""Heterogeneous pipeline scheduling for Ling 2.0: cost model, megatron-core schedule simulator,
layout planner (``ling-plan``) and the bubble profiler / report (``ling-bubbles``).

Trainer API::

    from megatron_ling.profiling.planner import plan_layout         # parallel.pipeline_layout: auto
    from megatron_ling.profiling.config import ProfilingConfig      # recipe section `profiling`
    from megatron_ling.profiling.recorder import PipelineProfiler   # with profiler.step(it, chunks): ...
"""
