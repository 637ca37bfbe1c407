"""Class-name lookup: ImageNet-1k data file and get_label_ids."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from aim_hf.labels import IMAGENET_CLASSES, ClassNameError, get_label_ids, load_imagenet_classes


def test_imagenet_data_file() -> None:
    data = json.loads(resources.files("aim_hf").joinpath("data/imagenet_classes.json").read_text())
    assert "timm" in data["source"]
    assert len(data["synsets"]) == 1000 and data["synsets"] == sorted(data["synsets"])
    assert data["synsets"][0] == "n01440764" and data["synsets"][207] == "n02099601"
    assert len(IMAGENET_CLASSES) == 1000
    assert all(
        entry and all(isinstance(n, str) and n.strip() == n and n for n in entry)
        for entry in IMAGENET_CLASSES
    )
    assert load_imagenet_classes() == IMAGENET_CLASSES
    # Well-known anchors of the standard index order.
    assert IMAGENET_CLASSES[0][0] == "tench"
    assert IMAGENET_CLASSES[1][0] == "goldfish"
    assert IMAGENET_CLASSES[207][0] == "golden retriever"
    assert IMAGENET_CLASSES[281][0] == "tabby"
    assert IMAGENET_CLASSES[999][0] == "toilet tissue"


def test_names_synonyms_and_case() -> None:
    assert get_label_ids("golden retriever") == [207]
    assert get_label_ids("tench") == [0]
    assert get_label_ids("Tinca tinca") == [0]  # synonym
    assert get_label_ids("  GOLDEN Retriever ") == [207]
    assert get_label_ids(["toilet paper", "goldfish", "tabby cat"]) == [999, 1, 281]


def test_ids_mixed_with_names() -> None:
    assert get_label_ids(5) == [5]
    assert get_label_ids([0, "golden retriever", 999]) == [0, 207, 999]
    assert get_label_ids("207") == [207]  # digit strings from a command line
    assert get_label_ids(torch.tensor([3, 4])) == [3, 4]
    assert get_label_ids(torch.tensor(7)) == [7]
    assert get_label_ids([]) == []


def test_main_name_beats_synonym_and_ambiguity_is_reported() -> None:
    # "harp" is class 594's main name and also a synonym of the harmonica (593).
    assert get_label_ids("harp") == [594]
    with pytest.raises(ValueError, match=r"ambiguous.*134 \(crane\).*517 \(crane\)"):
        get_label_ids("crane")


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown class name 'golden retreiver'.*'golden retriever' -> 207"):
        get_label_ids("golden retreiver")
    with pytest.raises(ValueError, match=r"unknown class name 'qwxz'$"):
        get_label_ids("qwxz")
    with pytest.raises(ClassNameError, match=r"unknown class name '²'"):  # a digit int() refuses
        get_label_ids(["²"], IMAGENET_CLASSES)


@pytest.mark.parametrize("bad", [1000, -1, [0, 1000], "1000"])
def test_out_of_range_ids(bad) -> None:
    with pytest.raises(ValueError, match=r"out of range \[0, 1000\)"):
        get_label_ids(bad)


@pytest.mark.parametrize("bad", [True, 2.5, [1, None]])
def test_invalid_label_types(bad) -> None:
    with pytest.raises(ValueError, match="names or ids"):
        get_label_ids(bad)


def test_custom_class_list() -> None:
    digits = [[str(i), name] for i, name in enumerate(["zero", "one", "two", "three"])]
    assert get_label_ids(["Two", "three", 1], names=digits) == [2, 3, 1]
    assert get_label_ids("0", names=digits) == [0]  # the name "0", which is also id 0
    with pytest.raises(ValueError, match=r"out of range \[0, 4\)"):
        get_label_ids(4, names=digits)
    with pytest.raises(ValueError, match=r"'three' -> 3 \(3\)"):
        get_label_ids("tree", names=digits)
    # A plain list of single names works too.
    assert get_label_ids("cat", names=["dog", "cat"]) == [1]
