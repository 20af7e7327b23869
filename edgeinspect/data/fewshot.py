"""The real-defect split shared by the generators and the downstream benchmark.

Per defect type of test/, the image names are permuted with a seed derived from the split seed
and the type's name (so adding a type does not reshuffle the others). The first ceil(fraction * n)
form the few-shot set DualAnoDiff trains on; the first `adabldm_per_type` of those are AdaBLDM's
seeds (so AdaBLDM's seeds are a subset of the few-shot set); the rest is left for evaluation.
Every image a generator has seen must stay out of evaluation: `excluded()` / `write_exclude()`
give the names for `edgeinspect test --exclude` and `MVTecFolder(exclude=...)`.

    python -m edgeinspect.data.fewshot --data ../shared/data/mtd --out configs/mtd_fewshot_split.json \
        --exclude configs/mtd_fewshot_exclude.txt
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from pathlib import Path

import numpy as np
from pydantic import BaseModel, model_validator

from edgeinspect.data.mvtec import IMAGE_SUFFIXES, DatasetError
from edgeinspect.core.atomic import write_json_atomic, write_text_atomic


class FewShotSplit(BaseModel):
    data: str  # the dataset root the split was drawn from (provenance only)
    fraction: float
    adabldm_per_type: int
    seed: int
    fewshot: dict[str, list[str]]
    adabldm_seeds: dict[str, list[str]]
    evaluation: dict[str, list[str]]
    # few-shot names that also name an image in another test/ folder: excluding by name would drop
    # that one too (MVTec AD names every folder's images 000.png, 001.png, ...)
    ambiguous_names: list[str] = []

    @model_validator(mode="after")
    def _consistent(self) -> FewShotSplit:
        types = set(self.fewshot)
        if set(self.adabldm_seeds) != types or set(self.evaluation) != types:
            raise ValueError("fewshot, adabldm_seeds and evaluation must list the same defect types")
        for t in types:
            if not set(self.adabldm_seeds[t]) <= set(self.fewshot[t]):
                raise ValueError(f"{t}: AdaBLDM seeds must be a subset of the few-shot images")
            if set(self.fewshot[t]) & set(self.evaluation[t]):
                raise ValueError(f"{t}: few-shot and evaluation images overlap")
        return self

    @property
    def defect_types(self) -> list[str]:
        return sorted(self.fewshot)

    def excluded(self) -> set[str]:
        """File names every generator may have seen: to leave out of any evaluation."""
        return {name for names in self.fewshot.values() for name in names}

    def seeds(self, which: str) -> dict[str, list[str]]:
        """The real defects a source may use: "adabldm" (its seeds) or "fewshot" (DualAnoDiff's)."""
        if which == "adabldm":
            return self.adabldm_seeds
        if which == "fewshot":
            return self.fewshot
        raise ValueError(f"seeds must be 'adabldm' or 'fewshot', not {which!r}")

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.model_dump())

    @classmethod
    def load(cls, path: str | Path) -> FewShotSplit:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no few-shot split file {path} (make one with python -m edgeinspect.data.fewshot)")
        return cls.model_validate(json.loads(path.read_text()))

    def write_exclude(self, path: str | Path) -> None:
        """One excluded file name per line (what `edgeinspect test --exclude` reads)."""
        if self.ambiguous_names:
            raise ValueError(
                f"{len(self.ambiguous_names)} few-shot file names (e.g. {self.ambiguous_names[:3]}) also name images "
                "in other test/ folders, so a name-based exclude file would drop those too; filter by (type, name) "
                "with the split's `evaluation` lists instead")
        write_text_atomic(path, "".join(f"{n}\n" for n in sorted(self.excluded())))


def _type_permutation(names: list[str], seed: int, defect_type: str) -> list[str]:
    rng = np.random.default_rng([seed, zlib.crc32(defect_type.encode())])
    return [names[i] for i in rng.permutation(len(names))]


def fewshot_split(root: str | Path, fraction: float = 1 / 3, adabldm_per_type: int = 10, seed: int = 0) -> FewShotSplit:
    """Split every defect type of `root`/test into few-shot (with AdaBLDM seeds) and evaluation images."""
    root = Path(root)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if adabldm_per_type < 1:
        raise ValueError(f"adabldm_per_type must be >= 1, got {adabldm_per_type}")
    test = root / "test"
    if not test.is_dir():
        raise DatasetError(f"{root} has no test/ folder: not an MVTec-layout dataset")
    types = sorted(d.name for d in test.iterdir() if d.is_dir() and d.name != "good")
    if not types:
        raise DatasetError(f"{test} has no defect-type folders")
    listed = {t: sorted(p.name for p in (test / t).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
              for t in sorted(d.name for d in test.iterdir() if d.is_dir())}
    fewshot, seeds, evaluation = {}, {}, {}
    for t in types:
        names = listed[t]
        n_few = math.ceil(fraction * len(names))
        if n_few < adabldm_per_type or n_few >= len(names):
            raise DatasetError(
                f"defect type {t!r} has {len(names)} images: a few-shot set of ceil({fraction:g} * {len(names)}) = "
                f"{n_few} must hold the {adabldm_per_type} AdaBLDM seeds and leave at least one image for evaluation")
        order = _type_permutation(names, seed, t)
        fewshot[t] = order[:n_few]
        seeds[t] = order[:adabldm_per_type]
        evaluation[t] = order[n_few:]
    ambiguous = sorted({n for t, names in fewshot.items() for n in names
                        if any(n in other for u, other in listed.items() if u != t)})
    return FewShotSplit(data=str(root), fraction=fraction, adabldm_per_type=adabldm_per_type, seed=seed,
                        fewshot=fewshot, adabldm_seeds=seeds, evaluation=evaluation, ambiguous_names=ambiguous)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Draw the few-shot / AdaBLDM-seed / evaluation split of test/ defects")
    p.add_argument("--data", type=Path, required=True, help="MVTec-layout dataset root")
    p.add_argument("--out", type=Path, required=True, help="split JSON to write")
    p.add_argument("--exclude", type=Path, help="also write the excluded file names here (for --exclude)")
    p.add_argument("--fraction", type=float, default=1 / 3)
    p.add_argument("--adabldm-per-type", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    split = fewshot_split(args.data, args.fraction, args.adabldm_per_type, args.seed)
    split.save(args.out)
    if args.exclude:
        split.write_exclude(args.exclude)
    for t in split.defect_types:
        print(f"{t}: {len(split.fewshot[t])} few-shot ({len(split.adabldm_seeds[t])} AdaBLDM seeds), "
              f"{len(split.evaluation[t])} for evaluation")


if __name__ == "__main__":
    main()
