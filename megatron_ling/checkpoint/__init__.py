"""Checkpoint directory format (``layout``): the single owner of iteration dirs, the tracker and
the common state. Saving/loading model state is ``megatron_ling.training.checkpoint``'s job."""
