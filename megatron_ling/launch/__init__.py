"""Slurm launching for megatron-ling (`ling-slurm`).

spec.py      SlurmJobSpec: what a job asks for, validated before anything is rendered
render.py    the batch script: #SBATCH header + settings + templates/train_body.sh
submit.py    run directory (resolved recipe, provenance, pip freeze) and sbatch
slurmctl.py  sbatch/scontrol/squeue/sacct/scancel wrappers with one-line errors
cli.py       ling-slurm submit|resubmit|status|logs|cancel
reaper.py    per-task wrapper: ends processes a killed trainer leaves behind
templates/train_body.sh  the launch logic of every job (rendezvous, stop requests, requeue)
"""
from megatron_ling.launch.spec import SlurmJobSpec  # noqa: F401
