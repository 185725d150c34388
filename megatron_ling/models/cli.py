"""ling-params: analytic parameter counts of a Ling preset or HF config.json."""
from __future__ import annotations

import argparse
import sys

from megatron_ling.errors import cli_main


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ling-params", description=__doc__)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", help="ling-mini-2.0 | ling-flash-2.0 | ling-1t | ling-tiny | ling-small")
    g.add_argument("--hf-config", help="HF model directory or config.json")
    args = p.parse_args(argv)
    from megatron_ling.models.config import LingConfig, get_preset
    from megatron_ling.models.params import count_parameters, format_count

    cfg = get_preset(args.preset) if args.preset else LingConfig.from_hf_config(args.hf_config)
    cfg.validate()
    print(f"{'':22s}{'total':>12s}{'active':>12s}")
    for mtp in (False, True):
        c = count_parameters(cfg, include_mtp=mtp)
        tag = "with MTP" if mtp else "without MTP"
        print(f"{tag + ':':22s}{format_count(c.total):>12s}{format_count(c.active):>12s}")
        print(f"{'  non-embedding':22s}{format_count(c.total_non_embedding):>12s}{format_count(c.active_non_embedding):>12s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
