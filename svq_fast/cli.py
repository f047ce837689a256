"""Shared command line of the training recipes: `--config NAME` then `--section.field=value` overrides."""

from __future__ import annotations

import sys

from svq_fast.config import ConfigError, apply_overrides
from svq_fast.named_configs import get_config


def parse(argv: list[str], default: str, expected_type: type):
    """-> config; exits with status 2 and a message naming the key on any config error."""
    args = list(argv)
    # launchers append --local_rank=N (deepspeed) which is not a config key
    args = [a for a in args if not a.startswith("--local_rank")]
    # --profile: capture a torch.profiler trace into <run_dir>/profile (viewable in TensorBoard)
    args = ["--log.profile=true" if a == "--profile" else a for a in args]
    name = default
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            sys.exit("error: --config needs a name")
        name = args[i + 1]
        del args[i : i + 2]
    else:
        for a in list(args):
            if a.startswith("--config="):
                name = a.split("=", 1)[1]
                args.remove(a)
    try:
        cfg = get_config(name)
        if not isinstance(cfg, expected_type):
            raise ConfigError(f"config {name!r} is a {type(cfg).__name__}, this recipe needs {expected_type.__name__}")
        return apply_overrides(cfg, args)
    except (ConfigError, KeyError) as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
