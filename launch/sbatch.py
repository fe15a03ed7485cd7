"""Print (or write) the SLURM sbatch script of a recipe on a cluster.

    python -m launch.sbatch recipe=mixtral_8x7b cluster.nodes=4 cluster.gpus_per_node=8 \
        cluster.time=48:00:00 cluster.partition=gpu parallel.pp=2 parallel.dp=-1 [--output job.sbatch]

The config is validated first at world size nodes x gpus_per_node (one line and exit 2 if it cannot
run); the script runs one torchrun agent per node (`srun`, one task per node) that meet over c10d
at the allocation's first node. `cluster.*` configure the job; every other override is passed on.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from data.errors import OneLineArgumentParser
from launch.commands import load_job, sbatch_script, split_overrides
from trainer.errors import ConfigError


def main(argv: list[str]) -> int:
    parser = OneLineArgumentParser(prog="python -m launch.sbatch", description=__doc__.split("\n")[0])
    parser.add_argument("--output", "-o", type=Path, help="write the script here instead of stdout")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. recipe=mixtral_8x7b cluster.nodes=4"
    )
    args = parser.parse_args(argv)
    try:
        job = load_job(args.overrides)
    except ConfigError as e:
        print(f"moeforge: config error: {e}", file=sys.stderr)
        return 2
    script = sbatch_script(job, split_overrides(args.overrides)[0])
    if args.output:
        tmp = args.output.with_name(args.output.name + ".tmp")
        try:
            tmp.write_text(script)
            os.replace(tmp, args.output)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            print(
                f"moeforge: --output {args.output}: cannot write it ({e.strerror}); choose another path",
                file=sys.stderr,
            )
            return 2
        print(f"wrote {args.output}: sbatch {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(script)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
