"""The shared few-shot split: disjoint, nested, seeded, round-trips, and its exclude file works."""

from __future__ import annotations

import json
import math

import pytest

from edgeinspect.data.fewshot import FewShotSplit, fewshot_split, main
from edgeinspect.data.mvtec import DatasetError, MVTecFolder
from edgeinspect.evaluation.evaluate import read_name_list

try:
    from tests.conftest import REPO, make_mvtec
except ImportError:
    from conftest import REPO, make_mvtec


@pytest.fixture
def dataset(tmp_path):
    root = make_mvtec(tmp_path / "cat", n_train=1, n_good=3, n_defect=12, size=(16, 16))
    for p in (root / "test/good").iterdir():  # unique names, as in MTD
        p.rename(p.with_name(f"g{p.name}"))
    # a second type, its files named like the first's: names are per type
    (root / "test/dent").mkdir()
    (root / "ground_truth/dent").mkdir()
    for p in sorted((root / "test/scratch").iterdir())[:9]:
        (root / "test/dent" / f"d{p.name}").write_bytes(p.read_bytes())
        (root / "ground_truth/dent" / f"d{p.stem}_mask.png").write_bytes(
            (root / "ground_truth/scratch" / f"{p.stem}_mask.png").read_bytes())
    return root


def test_split_counts_disjointness_and_nesting(dataset):
    s = fewshot_split(dataset, fraction=1 / 3, adabldm_per_type=2, seed=0)
    assert s.defect_types == ["dent", "scratch"]
    for t, n in (("scratch", 12), ("dent", 9)):
        assert len(s.fewshot[t]) == math.ceil(n / 3)
        assert len(s.adabldm_seeds[t]) == 2
        assert set(s.adabldm_seeds[t]) <= set(s.fewshot[t])
        assert not set(s.fewshot[t]) & set(s.evaluation[t])
        assert sorted(s.fewshot[t] + s.evaluation[t]) == sorted(p.name for p in (dataset / "test" / t).iterdir())
    assert s.excluded() == set(s.fewshot["scratch"]) | set(s.fewshot["dent"])
    assert s.seeds("fewshot") == s.fewshot and s.seeds("adabldm") == s.adabldm_seeds


def test_split_is_seeded(dataset):
    a = fewshot_split(dataset, adabldm_per_type=2, seed=0)
    assert a == fewshot_split(dataset, adabldm_per_type=2, seed=0)
    b = fewshot_split(dataset, adabldm_per_type=2, seed=1)
    assert a.fewshot != b.fewshot


def test_too_few_images_is_an_error(dataset):
    with pytest.raises(DatasetError, match=r"'dent' has 9 images: a few-shot set of ceil\(0.333333 \* 9\) = 3 "
                                           r"must hold the 4 AdaBLDM seeds"):
        fewshot_split(dataset, adabldm_per_type=4)


def test_save_load_and_exclude_file_with_mvtec_folder(dataset, tmp_path):
    s = fewshot_split(dataset, adabldm_per_type=2)
    s.save(tmp_path / "split.json")
    assert FewShotSplit.load(tmp_path / "split.json") == s
    s.write_exclude(tmp_path / "exclude.txt")
    names = read_name_list(tmp_path / "exclude.txt")
    assert names == s.excluded()
    data = MVTecFolder(dataset, "test", 16, exclude=names)
    kept = {(x.defect_type, x.path.name) for x in data.samples}
    expected = {(t, n) for t in s.defect_types for n in s.evaluation[t]}
    assert {k for k in kept if k[0] != "good"} == expected
    assert sum(k[0] == "good" for k in kept) == 3


def test_names_shared_across_folders_refuse_a_name_based_exclude_file(tmp_path):
    root = make_mvtec(tmp_path / "mvtec_like", n_good=12, n_defect=12, size=(16, 16))  # 000.png in both folders
    s = fewshot_split(root, adabldm_per_type=2)
    assert s.ambiguous_names == sorted(s.fewshot["scratch"]) and len(s.ambiguous_names) == 4
    with pytest.raises(ValueError, match="also name images in other test/ folders"):
        s.write_exclude(tmp_path / "x.txt")


def test_inconsistent_file_is_refused(dataset, tmp_path):
    s = fewshot_split(dataset, adabldm_per_type=2).model_dump()
    s["adabldm_seeds"]["dent"] = [s["evaluation"]["dent"][0]]
    (tmp_path / "bad.json").write_text(json.dumps(s))
    with pytest.raises(ValueError, match="dent: AdaBLDM seeds must be a subset"):
        FewShotSplit.load(tmp_path / "bad.json")


def test_command_line(dataset, tmp_path, capsys):
    main(["--data", str(dataset), "--out", str(tmp_path / "s.json"), "--exclude", str(tmp_path / "x.txt"),
          "--adabldm-per-type", "2"])
    assert "scratch: 4 few-shot (2 AdaBLDM seeds), 8 for evaluation" in capsys.readouterr().out
    assert FewShotSplit.load(tmp_path / "s.json") == fewshot_split(dataset, adabldm_per_type=2)


def test_committed_mtd_split_is_consistent():
    s = FewShotSplit.load(REPO / "configs/mtd_fewshot_split.json")
    counts = {"blowhole": 115, "break": 85, "crack": 57}
    for t, n in counts.items():
        assert len(s.fewshot[t]) == math.ceil(n / 3) and len(s.adabldm_seeds[t]) == 10
        assert len(s.fewshot[t]) + len(s.evaluation[t]) == n
    written = (REPO / "configs/mtd_fewshot_exclude.txt").read_text().split()
    assert set(written) == s.excluded() and len(written) == sum(math.ceil(n / 3) for n in counts.values())
    assert s.ambiguous_names == []
