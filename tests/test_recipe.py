"""Recipes from flags, YAML and JSON; validation names the offending option."""

import json

import pytest

from lowc.errors import UsageError
from lowc.recipe import Recipe


def test_yaml_and_json_give_the_same_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("vnm: '64:2:5'\nwbits: 6\ngroup: 64\nskip: ['*.down_proj']\n")
    (tmp_path / "r.json").write_text(json.dumps({"vnm": "64:2:5", "wbits": 6, "group": 64, "skip": ["*.down_proj"]}))
    a, b = Recipe.from_file(tmp_path / "r.yaml"), Recipe.from_file(tmp_path / "r.json")
    assert a == b and a.vnm_spec.m == 5 and a.group == 64


@pytest.mark.parametrize("data,flag", [({"wbits": 5}, "--wbits"), ({"wbits": True}, "--wbits"), ({"group": 0}, "--group"),
                                       ({"group": 100}, "--group"), ({"vnm": "64:3:5"}, "--vnm"), ({"colour": 1}, "unknown"),
                                       ({"vnm": "64:2:5", "permute": "yes"}, "--permute"),
                                       ({"vnm": "64:2:5", "permute_iterations": 0}, "--permute-iterations")])
def test_bad_values_rejected(data, flag):
    with pytest.raises(UsageError, match=flag):
        Recipe.from_dict(data)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        Recipe.from_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        Recipe.from_file(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="expected a mapping"):
        Recipe.from_file(tmp_path / "list.yaml")


def test_skip_and_keep_dense_patterns():
    r = Recipe(wbits=6, skip=["*.down_proj"])
    assert r.scheme_for("model.layers.0.mlp.down_proj", (8, 8), "bfloat16", False) is None
    assert r.scheme_for("lm_head", (8, 8), "bfloat16", False, keep_dense=("lm_head",)) is None
    s = r.scheme_for("model.layers.0.mlp.up_proj", (8, 8), "bfloat16", False)
    assert s.bits == 6 and s.vnm is None
