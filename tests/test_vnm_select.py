"""`--vnm auto --sparsity S`: M from the sparsity, V per layer type from the importance kept."""

import json

import pytest
import torch

import lowc
from lowc.compress.sparsity.select import layer_type, m_for_sparsity, select_vnm
from lowc.errors import UsageError


def test_m_for_sparsity():
    assert m_for_sparsity(0.5) == 4 and m_for_sparsity(0.6) == 5 and m_for_sparsity(0.75) == 8
    with pytest.raises(UsageError, match="--sparsity"):
        m_for_sparsity(0.95)


def test_layer_type():
    assert layer_type("model.layers.12.mlp.up_proj") == "model.layers.*.mlp.up_proj"
    assert layer_type("encoder.layer.3.attention.self.query") == "encoder.layer.*.attention.self.query"


def test_picks_large_v_when_rows_agree_and_small_v_when_they_do_not():
    g = torch.Generator().manual_seed(0)
    shared = torch.rand(1, 100, generator=g).repeat(256, 1)  # every row ranks the columns alike: V costs nothing
    noisy = torch.rand(256, 100, generator=g) ** 8  # rows disagree: larger V keeps much less
    choice, report = select_vnm({"a.0.x": shared, "b.0.y": noisy}, m=5)
    assert choice["a.*.x"].v == 128
    assert choice["b.*.y"].v == 16
    kept = report["layer_types"]["b.*.y"]["kept_fraction"]
    assert kept["16"] > kept["32"] > kept["64"] > kept["128"]


def test_recipe_validation():
    with pytest.raises(UsageError, match="--sparsity"):
        lowc.Recipe(vnm="auto")
    with pytest.raises(UsageError, match="--vnm auto"):
        lowc.Recipe(vnm="64:2:5", sparsity=0.6)
    assert lowc.Recipe(vnm="auto", sparsity=0.6).auto_m == 5


def test_auto_vnm_end_to_end(tiny_llama, tmp_path):
    art = lowc.compress(tiny_llama, tmp_path / "a", vnm="auto", sparsity=0.75, progress=False)
    manifest = json.loads((art / "lowc.json").read_text())
    selection = manifest["metrics"]["vnm_selection"]
    assert selection["m"] == 8 and len(selection["layer_types"]) == 7
    for name, scheme in manifest["modules"].items():
        assert scheme["vnm"] == selection["layer_types"][layer_type(name)]["vnm"]
    model = lowc.load(art)
    assert model(torch.tensor([[3, 4, 5]])).isfinite().all()
