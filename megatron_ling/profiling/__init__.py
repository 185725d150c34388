"""Measuring pipelines on top of the trainer: the profiled-run and calibration driver
(``ling-plan calibrate / measure``), the bubble report (``ling-bubbles``) and their CLIs.

The pure scheduling parts (cost model, simulator, planner, timelines, the profile file format)
live in ``megatron_ling.pipeline``; the recorder that hooks megatron-core's schedules during
training is ``megatron_ling.training.profiler``.
"""
