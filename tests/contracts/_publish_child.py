"""Child process of the kill test: publishes one version slowly so the parent can SIGKILL it.

Usage: python _publish_child.py ROOT TAG N_FILES SLEEP_S

Prints "ready" once imports are done, then publishes a version whose N_FILES files each hold
TAG, writing every file in two halves with SLEEP_S seconds between the writes, so a kill lands
mid-file, between files, or in the fsync/rename/CURRENT phases that follow.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from recsys_contracts.artifacts import publish
from recsys_contracts.signing import signer_for


def payload(tag: str) -> bytes:
    """The 4 KiB content of every file of a version published with ``tag``."""
    return (tag.encode() * (4096 // len(tag) + 1))[:4096]


def main(argv: list[str]) -> int:
    root, tag, n_files, sleep_s = Path(argv[0]), argv[1], int(argv[2]), float(argv[3])
    content = payload(tag)

    def write_files(folder: Path) -> None:
        (folder / "nested").mkdir()
        for i in range(n_files):
            target = folder / ("nested" if i % 2 else ".") / f"part-{i}.bin"
            with open(target, "wb") as f:
                f.write(content[:2048])
                f.flush()
                time.sleep(sleep_s)
                f.write(content[2048:])

    signer = signer_for()     # the suite's key, from $RECSYS_SIGNING_KEY (tests/conftest.py)
    print("ready", flush=True)
    version = publish(root, write_files, signer=signer, data={"tag": tag}, config={}, metrics={})
    print(f"published {version}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
