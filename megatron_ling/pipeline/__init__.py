"""Pure pipeline scheduling for Ling 2.0 (no process groups, nothing from training or profiling):

* ``costmodel``  per-unit FLOPs / bytes / seconds (analytic or from a ``ling-plan calibrate`` file);
* ``simulator``  megatron-core's 1F1B / interleaved schedules as an event simulation, and the
  prediction of a measured timeline;
* ``planner``    the pipeline layout planner (``parallel.pipeline_layout: auto``, ``ling-plan``);
* ``timeline``   the one event / timeline type shared by measurements and the simulator;
* ``profile``    the bubble profile file format (writer and reader of ``rank*.json`` and their meta).
"""
