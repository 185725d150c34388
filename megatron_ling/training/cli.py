"""ling-train: train a Ling model from a recipe.

    torchrun --nproc_per_node=8 -m megatron_ling.training.cli --config RECIPE.yaml [key=value ...]
    ling-train --nproc-per-node 2 --config quickstart            # starts torchrun itself

Overrides are dotted recipe keys: parallel.tp=2 training.train_iters=100 model.overrides.num_hidden_layers=8
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_ling.errors import cli_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ling-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe YAML, or a built-in recipe name (quickstart)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="start this many local processes with torchrun (single node; for clusters use ling-slurm)")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--check", action="store_true", help="validate the recipe for the world size and exit")
    p.add_argument("overrides", nargs="*", help="dotted.key=value recipe overrides")
    return p.parse_args(argv)


def _launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _not_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) != 0  # every rank fails alike: rank 0 reports it


@cli_main(quiet=_not_rank0)
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from megatron_ling.training.recipe import load_recipe

    world = args.nproc_per_node if (args.nproc_per_node and not _launched()) else int(os.environ.get("WORLD_SIZE", "1"))
    recipe = load_recipe(args.config, args.overrides)
    if args.print_config:
        print(recipe.to_yaml())
        return 0
    if args.check or (args.nproc_per_node and not _launched()):
        from megatron_ling.training.trainer import preflight

        preflight(recipe, world)  # one clear line, before any process starts
        if args.check:
            print(f"recipe OK for world size {world}")
            return 0
    if args.nproc_per_node and not _launched():
        rest = [a for a in argv if not a.startswith("--nproc-per-node")]
        if "--nproc-per-node" in argv:
            i = argv.index("--nproc-per-node")
            rest = argv[:i] + argv[i + 2:]
        from megatron_ling.local_launch import torchrun_local
        from megatron_ling.training.run_lock import child_env, hold

        hold(recipe.run_dir)  # for the run's life; a second run on this dir stops here
        stop_file = os.environ.get("LING_STOP_FILE") or os.path.join(os.path.abspath(recipe.run_dir), ".stop")
        return torchrun_local(args.nproc_per_node, "megatron_ling.training.cli", rest, stop_file,
                              env=child_env(recipe.run_dir))
    from megatron_ling.training.trainer import train

    result = train(recipe)
    return 0 if result.reason in ("completed", "preempted") else 1


if __name__ == "__main__":
    sys.exit(main())
