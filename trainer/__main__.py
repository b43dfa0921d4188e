"""Command line: ``python -m trainer [train|baselines] [--config FILE] [--set section.key=value ...]``.

``train`` (the default) runs the whole job and publishes when an artifact root is set (flag or
``RECSYS_ARTIFACT_ROOT``); ``baselines`` prints the dataset report and the popularity / EASE table
under every split protocol. Environment (read once): RECSYS_ARTIFACT_ROOT, RECSYS_DATA_DIR,
RECSYS_REDIS_URL, RECSYS_REDIS_NAMESPACE, RECSYS_LOG_LEVEL, RECSYS_SIGNING_KEY (the private key that
signs published versions; ``--unsigned`` publishes without one, for local experiments).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from trainer.config import TrainConfig, apply_overrides, build_config, read_config_file

ENV_OVERRIDES = {"RECSYS_ARTIFACT_ROOT": "publish.artifact_root", "RECSYS_DATA_DIR": "data.data_dir",
                 "RECSYS_REDIS_URL": "publish.redis_url", "RECSYS_REDIS_NAMESPACE": "publish.redis_namespace",
                 "RECSYS_SIGNING_KEY": "publish.signing_key"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="train", choices=("train", "baselines"))
    parser.add_argument("--config", help="TOML, YAML or JSON config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    parser.add_argument("--dataset", help="shorthand for --set data.dataset=...")
    parser.add_argument("--artifact-root", help="publish here (default $RECSYS_ARTIFACT_ROOT)")
    parser.add_argument("--output-dir", help="write the report here; shorthand for --set run.output_dir=... "
                                             "(default runs/latest)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), help="shorthand for --set run.device=...")
    parser.add_argument("--unsigned", action="store_true",
                        help="publish unsigned versions (local experiments; services refuse them unless "
                             "RECSYS_ALLOW_UNSIGNED=1); shorthand for --set publish.unsigned=true")
    parser.add_argument("--show", type=int, default=3, help="users whose recommendations are printed")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace, environ=os.environ) -> TrainConfig:
    values = read_config_file(__import__("pathlib").Path(args.config)) if args.config else {}
    overrides = [f"{key}={environ[name]}" for name, key in ENV_OVERRIDES.items() if environ.get(name)]
    for flag, key in (("dataset", "data.dataset"), ("artifact_root", "publish.artifact_root"),
                      ("device", "run.device"), ("output_dir", "run.output_dir")):
        if getattr(args, flag):
            overrides.append(f"{key}={getattr(args, flag)}")
    if getattr(args, "unsigned", False):
        overrides.append("publish.unsigned=true")
    return build_config(apply_overrides(values, overrides + args.overrides))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("RECSYS_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    from trainer import cli_output, job
    from trainer.data import DataError

    try:
        if args.command == "baselines":
            job.apply_threads(cfg)      # the EASE grid's factorisations are most of its time
            print(cli_output.baselines_table(cfg))
            return 0
        result = job.run(cfg)
    except DataError as error:      # the log itself: its message names the file, line and column
        print(f"data error: {error}", file=sys.stderr)
        return 2
    print(cli_output.summary(result, show_users=args.show))
    return 0 if result.refused is None else 3


if __name__ == "__main__":
    sys.exit(main())
