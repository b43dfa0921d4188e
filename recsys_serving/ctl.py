"""Operators' command for the version lifecycle: ``python -m recsys_serving.ctl show|promote|rollback|arms``.

- ``show``: CURRENT and every version, each marked live, staged (newer than CURRENT, never live)
  or older (a rollback target);
- ``promote N``: puts version N live through ``recsys_contracts.bundle.go_live`` (signature and
  checksums against the trusted keys, the whole bundle's self-check, its features into Redis and
  marked complete with ``--redis-url``, then CURRENT); both services follow CURRENT and keep the
  version they served before loaded, so requests in flight and pinned ones still find it;
- ``rollback [--to N]``: the same go-live for N, by default the newest version below CURRENT; a
  service that still holds it as its previous version swaps back without loading anything;
- ``arms set --candidate N --canary-percent P [--shadow-percent S]`` / ``arms clear``: the candidate
  version N (verified like a promotion, its features written with ``--redis-url``, CURRENT unchanged)
  serves the sticky P % canary share of users and shadows S % of the other requests
  (``recsys_contracts.arms``, ``ranking_service.shadow``); both services load it beside CURRENT.
  ``promote N`` of the candidate clears the arms once N is live.

Trust comes from ``--trusted-keys`` (default ``RECSYS_TRUSTED_KEYS``), as for the services: a version
they would refuse is never made CURRENT. Exit status 0 on success, 1 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from recsys_contracts import artifacts, bundle, feature_store
from recsys_contracts.arms import Arms, read_arms, write_arms
from recsys_contracts.signing import Trust


def show(root: Path) -> str:
    """One line per version, newest first: number, created time, and live / staged / older."""
    current = artifacts.current_version(root)
    arms = read_arms(root)
    lines = [f"CURRENT {current if current is not None else '(none)'} under {root}",
             f"arms: candidate {arms.candidate} for {arms.canary_percent:g} % of users, shadowing "
             f"{arms.shadow_percent:g} % of the rest" if arms else "arms: none"]
    for version in reversed(artifacts.list_versions(root)):
        try:
            created = artifacts.read_manifest(root, version).created_at
        except artifacts.ArtifactError as error:
            created = f"unreadable manifest ({str(error)[:64]})"
        role = "live" if version == current else "canary" if arms and version == arms.candidate else \
            ("staged" if current is None or version > current else "older")
        lines.append(f"{version:>6}  {role:<6}  {created}")
    return "\n".join(lines)


def rollback_target(root: Path) -> int:
    """The newest version below CURRENT; ValueError when there is none."""
    current = artifacts.current_version(root)
    older = [v for v in artifacts.list_versions(root) if current is not None and v < current]
    if not older:
        raise ValueError(f"rollback needs a version below CURRENT ({current}) under {root}, got none")
    return older[-1]


def _go_live(root: Path, version: int, args: argparse.Namespace, *, candidate_only: bool = False) -> None:
    """``bundle.go_live`` (or, for a candidate, the same steps short of CURRENT)."""
    trust = Trust.unsigned() if args.allow_unsigned else Trust.from_path(args.trusted_keys)
    client = feature_store.redis_client(args.redis_url, socket_timeout_s=10.0, connect_timeout_s=2.0) \
        if args.redis_url else None
    keys = feature_store.KeyFormat(args.redis_namespace)
    try:
        if candidate_only:
            artifacts.verify(root, version, trust)
            checked = bundle.verify_bundle(artifacts.version_dir(root, version), version)
            if client is not None:
                feature_store.write_tables(client, keys, version, checked.tables, user_ids=checked.tables.user_ids,
                                           item_ids=checked.tables.item_ids)
        else:
            bundle.go_live(root, version, trust=trust, redis_client=client, keys=keys)
    finally:
        if client is not None:
            client.close()


def _arms(root: Path, args: argparse.Namespace) -> str:
    if args.arms_command == "clear":
        write_arms(root, None)
        return "arms cleared: every user is served CURRENT"
    arms = Arms(candidate=args.candidate, canary_percent=args.canary_percent, shadow_percent=args.shadow_percent)
    _go_live(root, arms.candidate, args, candidate_only=True)
    write_arms(root, arms)
    return (f"version {arms.candidate} serves {arms.canary_percent:g} % of users (canary) and shadows "
            f"{arms.shadow_percent:g} % of the other requests")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys_serving.ctl",
                                     description="Show, promote and roll back artifact versions.")
    parser.add_argument("--root", type=Path, default=os.environ.get("RECSYS_ARTIFACT_ROOT"),
                        help="artifact root (default: $RECSYS_ARTIFACT_ROOT)")
    parser.add_argument("--trusted-keys", default=os.environ.get("RECSYS_TRUSTED_KEYS"),
                        help="public key PEM file or folder (default: $RECSYS_TRUSTED_KEYS)")
    parser.add_argument("--allow-unsigned", action="store_true", help="accept unsigned versions (experiments only)")
    parser.add_argument("--redis-url", default=os.environ.get("RECSYS_REDIS_URL"),
                        help="write the version's features here before CURRENT moves (default: $RECSYS_REDIS_URL)")
    parser.add_argument("--redis-namespace", default=os.environ.get("RECSYS_REDIS_NAMESPACE", "recsys"))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("show", help="CURRENT and every version")
    promote = sub.add_parser("promote", help="put a version live (verified, features written, then CURRENT)")
    promote.add_argument("version", type=int)
    back = sub.add_parser("rollback", help="put an older version live again")
    back.add_argument("--to", type=int, default=None, help="the version (default: the newest below CURRENT)")
    arms_parser = sub.add_parser("arms", help="set or clear the canary arm")
    arms_sub = arms_parser.add_subparsers(dest="arms_command", required=True)
    set_arms = arms_sub.add_parser("set", help="a candidate version for a sticky share of users")
    set_arms.add_argument("--candidate", type=int, required=True)
    set_arms.add_argument("--canary-percent", type=float, required=True, help="share of users in [0, 100]")
    set_arms.add_argument("--shadow-percent", type=float, default=0.0,
                          help="share of the other requests the candidate also answers off the answer path")
    arms_sub.add_parser("clear", help="no arm: every user is served CURRENT")
    args = parser.parse_args(argv)
    if args.root is None:
        parser.error("--root (or RECSYS_ARTIFACT_ROOT) must name the artifact root, got neither")
    if args.command != "show" and not (args.trusted_keys or args.allow_unsigned):
        parser.error("--trusted-keys (or RECSYS_TRUSTED_KEYS) must name the public keys, got neither")
    try:
        if args.command == "show":
            print(show(args.root))
            return 0
        if args.command == "arms":
            print(_arms(args.root, args))
            return 0
        version = args.version if args.command == "promote" else \
            (args.to if args.to is not None else rollback_target(args.root))
        _go_live(args.root, version, args)
        arms = read_arms(args.root)
        if arms is not None and arms.candidate == version:
            write_arms(args.root, None)              # the candidate is live: the canary is over
    except (ValueError, OSError, artifacts.ArtifactError) as error:
        print(f"{args.command} failed: {str(error)[:500]}", file=sys.stderr)
        return 1
    print(f"version {version} is live under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
