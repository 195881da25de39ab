"""Position maps: the recomputed attention is the model's own, and p_ij is the sum of the gates."""

import json
from pathlib import Path

import pytest
import torch

from cope_pl.position_maps import contextual_positions, plot_position_maps, position_maps
from tests.conftest import tiny_model

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def attention_outputs(model, input_ids):
    """What each layer's attention produced (B, T, C), captured before its output projection."""
    outputs = {}
    hooks = [
        block.attn.out.register_forward_hook(lambda m, inp, out, i=i: outputs.__setitem__(i, inp[0]))
        for i, block in enumerate(model.blocks)
    ]
    with torch.no_grad():
        model(input_ids)
    for hook in hooks:
        hook.remove()
    return outputs


@pytest.mark.parametrize("position", ["cope", "cope_sepkeys", "rope_cope", "rope"])
def test_recomputed_attention_reproduces_each_layer(position):
    model = tiny_model(position).eval()
    for p in model.position.parameters():  # CoPE tables start at zero; make them matter
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randint(0, 23, (2, 12))
    maps = position_maps(model, x)
    outputs = attention_outputs(model, x)
    captured = {}
    hooks = [
        b.attn.qkv.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
        for n, b in enumerate(model.blocks)
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for layer, layer_maps in enumerate(maps):
        v = captured[layer].view(2, 12, 3, 4, 8)[:, :, 2].transpose(1, 2)  # (B, H, T, D)
        expected = outputs[layer].view(2, 12, 4, 8).transpose(1, 2)
        torch.testing.assert_close(layer_maps["attention"] @ v, expected, rtol=1e-4, atol=1e-5)
        assert (layer_maps["positions"] is None) == (position == "rope")


def test_positions_are_sums_of_gates_from_key_to_query():
    gates = torch.randn(3, 5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    positions = contextual_positions(gates)
    i, j = 4, 1
    assert positions[0, i, j] == pytest.approx(torch.sigmoid(gates[0, i, j : i + 1]).sum().item(), rel=1e-6)
    assert positions[0, 1, 3] == 0  # a later key has no position
    assert contextual_positions(gates, npos_max=2).max() <= 1


def test_position_maps_png_is_written(tmp_path):
    model = tiny_model("cope")
    maps = position_maps(model, torch.randint(0, 23, (1, 6)))
    path = plot_position_maps(maps, [str(t) for t in range(6)], tmp_path / "layer0.png", layer=0)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_notebook_code_cells_compile():
    notebook = json.loads((NOTEBOOKS / "report.ipynb").read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert cells and all(not c.get("outputs") for c in cells)  # stored without outputs
    for n, cell in enumerate(cells):
        compile("".join(cell["source"]), f"report.ipynb cell {n}", "exec")
