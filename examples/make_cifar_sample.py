"""Cut the small CIFAR-10 sample shipped in the repo from the full archive (original JPEG bytes, ImageFolder
layout), so the README's main command calibrates and reports accuracy on a fresh clone.

    python examples/make_cifar_sample.py ../shared/data/cifar10-jpeg.tar.gz examples/data/cifar10-sample.tar.gz
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tarfile
from collections import defaultdict
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("dest")
    ap.add_argument("--train", type=int, default=512, help="training images (calibration), class-balanced")
    ap.add_argument("--test", type=int, default=2000, help="test images, class-balanced")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    want = {"train": args.train, "test": args.test}
    files: dict[str, dict[str, list[tuple[str, bytes]]]] = {s: defaultdict(list) for s in want}
    with tarfile.open(args.source) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) >= 4 and parts[-3] in want:
                fh = tar.extractfile(m)
                assert fh is not None
                files[parts[-3]][parts[-2]].append((m.name, fh.read()))
    rng = random.Random(args.seed)
    dest = Path(args.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as out:
        for split, per_class in files.items():
            classes = sorted(per_class)
            for i, cls in enumerate(classes):
                n = want[split] // len(classes) + (1 if i < want[split] % len(classes) else 0)
                for name, data in sorted(rng.sample(sorted(per_class[cls]), n)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    out.addfile(info, io.BytesIO(data))
    print(f"wrote {dest} ({dest.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
