"""Write a ``fixed-sigma`` file that scales whole block kinds of a model (MeZO with, e.g., the embedding damped).

    python scripts/sigma_file.py --model tiny-derived --scale embed_tokens=0.25 --out runs/damp-embed.json
    l2zo compare ... --optimizers "mezo,fixed-sigma:sigma_file=runs/damp-embed.json:label=damp-embed"

Every block of a kind named in ``--scale`` gets that raw sigma, every other block ``--default`` (1: MeZO's);
``fixed-sigma`` then normalises them (sum_b n_b sigma_b^2 = sum_b n_b), so the lr keeps MeZO's meaning. The
blocks are the model's (``l2zo.engine.blocks.partition``), so the file fits any model of that architecture.
"""

from __future__ import annotations

import argparse
import sys

from l2zo.engine.blocks import partition
from l2zo.errors import L2ZOError
from l2zo.optim.methods.fixed_sigma import kind_sigma, write_sigma_file


def parse_scale(item: str) -> tuple[str, float]:
    kind, sep, value = item.partition("=")
    try:
        if not sep or not kind:
            raise ValueError
        return kind, float(value)
    except ValueError:
        raise L2ZOError(f"--scale {item!r}: expected KIND=SIGMA, e.g. embed_tokens=0.25") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a model name or folder (as `l2zo finetune --model`)")
    p.add_argument("--scale", action="append", default=[], metavar="KIND=SIGMA", help="raw sigma of a block kind")
    p.add_argument("--default", type=float, default=1.0, help="raw sigma of the other blocks (default 1)")
    p.add_argument("--out", required=True, help="the JSON file to write")
    a = p.parse_args(argv)
    try:
        scales = dict(parse_scale(item) for item in a.scale)
        from l2zo.models import load_model

        names = [b.name for b in partition(load_model(a.model).model)]
        write_sigma_file(a.out, names, kind_sigma(names, scales, a.default))
    except L2ZOError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: {len(names)} blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
