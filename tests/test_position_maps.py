"""Position maps: the recomputed attention is the model's own, and p_ij is the sum of the gates."""

import json
from pathlib import Path

import pytest
import torch

from cope_pl.ops import contextual_positions
from cope_pl.position_maps import (
    map_title,
    plot_position_maps,
    position_maps,
    readable_token,
    row_normalised,
    unclamped_positions,
)
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
    positions = contextual_positions(gates, npos_max=100)
    i, j = 4, 1
    assert positions[0, i, j] == pytest.approx(torch.sigmoid(gates[0, i, j : i + 1]).sum().item(), rel=1e-6)
    assert positions[0, 1, 3] == 0  # a later key has no position
    assert contextual_positions(gates, npos_max=2).max() <= 1


def draw_maps(monkeypatch, tmp_path, t, tokens=True, title="copy-cope/version_0: cope, test sample 0", npos_max=None):
    """plot_position_maps for a tiny CoPE model on t tokens; the figure is drawn and returned unclosed."""
    from cope_pl.reporting.plots import pyplot

    plt = pyplot()
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    options = {"position_options": {"npos_max": npos_max}} if npos_max else {}
    maps = position_maps(tiny_model("cope", **options), torch.randint(0, 23, (1, t)))
    names = [f"tok{i}" for i in range(t)] if tokens else None
    path = plot_position_maps(maps, names, tmp_path / "layer0.png", layer=0, title=title)
    assert path.read_bytes()[:4] == b"\x89PNG"
    figures[-1].canvas.draw()
    return figures[-1]


def panels(fig):
    return [ax for ax in fig.axes if ax.get_title()]


def colour_bars(fig):
    return [ax for ax in fig.axes if not ax.get_title()]


def test_gates_positions_and_attention_each_get_a_row_with_one_colour_scale(monkeypatch, tmp_path):
    fig = draw_maps(monkeypatch, tmp_path, 6)
    titles = [ax.get_title() for ax in panels(fig)]
    assert titles == [f"{row}, head {h}" for row in ("gate g_ij", "position p_ij", "attention") for h in range(4)]
    bars = colour_bars(fig)  # one per row, shared by its heads
    assert [ax.get_ylabel() for ax in bars] == [
        "gate g_ij = sigmoid(q_i·k_j)", "contextual position p_ij (unclamped)", "attention / row max"
    ]  # fmt: skip
    for row in range(3):
        limits = {tuple(ax.images[0].get_clim()) for ax in panels(fig)[4 * row : 4 * row + 4]}
        assert len(limits) == 1  # the heads of a row are compared on one scale


def test_positions_past_the_table_are_drawn_unclamped_and_hatched_as_clamped(monkeypatch, tmp_path):
    fig = draw_maps(monkeypatch, tmp_path, 24, npos_max=4)
    position_panels = [ax for ax in panels(fig) if ax.get_title().startswith("position")]
    assert max(ax.images[0].get_clim()[1] for ax in position_panels) > 3  # beyond npos_max - 1: not clamped
    assert all(any("/" in str(getattr(c, "hatches", "")) for c in ax.collections) for ax in position_panels)
    assert "hatched: > npos_max - 1 = 3 (clamped)" in colour_bars(fig)[1].get_ylabel()


def test_unclamped_positions_are_reverse_sums_of_the_gates():
    gates = torch.tensor([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [1.0, 0.25, 1.0]])  # (T, S), 0 on masked keys
    expected = torch.tensor([[1.0, 0.0, 0.0], [1.5, 1.0, 0.0], [2.25, 1.25, 1.0]])
    torch.testing.assert_close(unclamped_positions(gates), expected)


def test_byte_level_tokens_are_shown_as_readable_text():
    assert [readable_token(t) for t in ("ĊĠĠĠ", "Ġthe", "âĢĶ", "âĢ", "<|endoftext|>")] == [
        "↵···", "·the", "—", "<e2><80>", "<|endoftext|>"
    ]  # fmt: skip


def test_axis_labels_are_no_smaller_than_tick_labels(monkeypatch, tmp_path):
    for t in (6, 50):
        ax = panels(draw_maps(monkeypatch, tmp_path, t))[0]
        ticks = max(label.get_fontsize() for label in ax.get_xticklabels() + ax.get_yticklabels())
        assert ax.xaxis.label.get_fontsize() >= ticks and ax.yaxis.label.get_fontsize() >= ticks


def test_attention_rows_are_scaled_to_their_maximum():
    attention = torch.softmax(torch.randn(2, 5, 5).masked_fill(~torch.ones(5, 5).bool().tril(), -torch.inf), -1)
    scaled = row_normalised(attention)
    torch.testing.assert_close(torch.nan_to_num(scaled, nan=0.0).amax(-1), torch.ones(2, 5))
    assert torch.isnan(scaled[0, 0, 1]) and not torch.isnan(scaled[0, 4, 0])  # masked keys are blank, not 0


def test_short_sequences_are_labelled_with_tokens_long_ones_with_positions(monkeypatch, tmp_path):
    short = panels(draw_maps(monkeypatch, tmp_path, 6))[0]
    assert [t.get_text() for t in short.get_xticklabels()] == [f"tok{i}" for i in range(6)]
    assert short.get_xlabel() == "key token j" and short.get_ylabel() == "query token i"
    long = panels(draw_maps(monkeypatch, tmp_path, 50))[0]
    assert long.get_xlabel() == "key position j" and long.get_ylabel() == "query position i"
    assert "tok0" not in [t.get_text() for t in long.get_xticklabels()]


def test_title_names_run_encoding_layer_and_sample(monkeypatch, tmp_path):
    run = tmp_path / "copy-cope" / "version_0"
    title = map_title(run, "cope", "test sample 3", 256, 128)
    assert title == "copy-cope/version_0: cope, test sample 3, 256 tokens (2x the training length 128)"
    fig = draw_maps(monkeypatch, tmp_path, 6, title=title)
    assert fig._suptitle.get_text() == title + ", layer 0"


def test_notebook_code_cells_compile():
    notebook = json.loads((NOTEBOOKS / "report.ipynb").read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert cells and all(not c.get("outputs") for c in cells)  # stored without outputs
    for n, cell in enumerate(cells):
        compile("".join(cell["source"]), f"report.ipynb cell {n}", "exec")
