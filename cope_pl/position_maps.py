"""CoPE's contextual positions p_ij and the attention they induce, per layer and head (paper Figure 4).

The maps are recomputed outside the model from what each attention layer saw: a forward hook on the
layer's qkv projection captures its input x and its q, k, v; the encoding's own hooks (transform_qk,
logit_term, CoPE's gate_logits) then give the logits, and p_ij follows the reference formula of
`cope_pl.ops.cope` (reverse cumulative sum of sigmoid gates, clamped at npos_max - 1). Nothing in the
position encodings changes, whatever attention implementation they use.

`cope-pl position-maps RUN --out DIR` draws them as PNGs for a test-set sample of the run's data.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import Tensor

from cope_pl.ops import causal_mask
from cope_pl.position.cope import ContextualPositionEncoding
from cope_pl.runs import load_config, resolve_run, run_label


def contextual_positions(gate_logits: Tensor, npos_max: int | None = None) -> Tensor:
    """(..., T, S) masked gate logits -> p_ij = sum_{t=j..i} sigmoid(gate_it), as CoPE uses them."""
    positions = torch.sigmoid(gate_logits).flip(-1).cumsum(-1).flip(-1)  # (..., T, S)
    return positions if npos_max is None else positions.clamp(max=npos_max - 1)


def find_cope(position) -> ContextualPositionEncoding | None:
    if isinstance(position, ContextualPositionEncoding):
        return position
    return next((p for p in getattr(position, "parts", []) if isinstance(p, ContextualPositionEncoding)), None)


@torch.no_grad()
def position_maps(model, input_ids: Tensor) -> list[dict[str, Tensor | None]]:
    """Per layer: {"attention": (B, H, T, T), "positions": (B, H, T, T) or None without CoPE}.

    model: a TransformerLM (or a LanguageModel wrapping one); input_ids: (B, T).
    """
    lm = getattr(model, "model", model)
    captured: dict[int, tuple[Tensor, Tensor]] = {}
    hooks = [
        block.attn.qkv.register_forward_hook(lambda m, inp, out, i=i: captured.__setitem__(i, (inp[0], out)))
        for i, block in enumerate(lm.blocks)
    ]
    was_training = lm.training
    try:
        lm.eval()
        lm(input_ids)
    finally:
        lm.train(was_training)
        for hook in hooks:
            hook.remove()
    position, cope = lm.position, find_cope(lm.position)
    maps = []
    for layer in range(len(lm.blocks)):
        x, qkv = captured[layer]
        b, t, c = x.shape
        h = lm.blocks[layer].attn.n_heads
        q, k, _ = qkv.view(b, t, 3, h, c // h).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        q, k = position.transform_qk(layer, q, k)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, H, T, T)
        logits = logits.masked_fill(~causal_mask(t, t, q.device), float("-inf"))
        scores = logits + position.logit_term(layer, x, q, k, logits) if position.adds_logit_term else logits
        positions = None
        if cope is not None:
            positions = contextual_positions(cope.gate_logits(layer, x, q, logits), cope.npos_max)
        maps.append({"attention": torch.softmax(scores, dim=-1), "positions": positions})
    return maps


def plot_position_maps(maps: list[dict], tokens: list[str] | None, path: Path, layer: int, title: str = "") -> Path:
    """One PNG for one layer: p_ij (top row, CoPE only) and attention (bottom row), one column per head."""
    from cope_pl.reporting.plots import pyplot

    plt = pyplot()
    attention = maps[layer]["attention"][0].float().cpu()  # (H, T, T)
    positions = maps[layer]["positions"]
    panels = [("attention", attention)]
    if positions is not None:
        p = positions[0].float().cpu().masked_fill(~causal_mask(*positions.shape[-2:]), float("nan"))
        panels.insert(0, ("position p_ij", p))
    heads, t = attention.size(0), attention.size(-1)
    size = max(2.5, min(6.0, t / 8))
    fig, axes = plt.subplots(len(panels), heads, figsize=(size * heads, size * len(panels)), squeeze=False)
    for r, (name, values) in enumerate(panels):
        for head in range(heads):
            ax = axes[r][head]
            image = ax.imshow(values[head], cmap="viridis", interpolation="nearest")
            ax.set_title(f"{name}, head {head}", fontsize=8)
            fig.colorbar(image, ax=ax, fraction=0.046)
            if tokens is not None and t <= 64:
                ax.set_xticks(range(t), tokens, fontsize=5, rotation=90)
                ax.set_yticks(range(t), tokens, fontsize=5)
            ax.set_xlabel("key j", fontsize=7)
            ax.set_ylabel("query i", fontsize=7)
    fig.suptitle(f"{title} layer {layer}".strip(), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sample_input(run: Path, index: int, seq_len: int | None) -> Tensor:
    """(1, T) token ids: sample `index` of the run's test data (optionally at another length)."""
    from cope_pl.eval_context import datamodule_at, test_loaders
    from cope_pl.runs import train_seq_len

    config = load_config(run)
    dm = datamodule_at(config, seq_len or train_seq_len(config), batch_size=index + 1)
    batch = next(iter(next(iter(test_loaders(dm).values()))))
    return batch["input_ids"][index : index + 1]


def main(argv: list[str] | None = None) -> None:
    from cope_pl.lm import LanguageModel

    parser = argparse.ArgumentParser(prog="cope-pl position-maps", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory or checkpoint file")
    parser.add_argument("--sample", type=int, default=0, help="index of the test sample to show")
    parser.add_argument("--length", type=int, default=None, help="sequence length (default: the training length)")
    parser.add_argument("--tokens", default=None, help="space-separated token ids instead of a test sample")
    parser.add_argument("--out", type=Path, default=None, help="default: <run>/position_maps/")
    args = parser.parse_args(argv)
    run, ckpt = resolve_run(args.run)
    model = LanguageModel.load_from_checkpoint(ckpt, map_location="cpu")
    if args.tokens:
        input_ids = torch.tensor([[int(t) for t in args.tokens.split()]])
    else:
        input_ids = sample_input(run, args.sample, args.length)
    maps = position_maps(model, input_ids)
    out = args.out or run / "position_maps"
    out.mkdir(parents=True, exist_ok=True)
    tokens = [str(t) for t in input_ids[0].tolist()]
    for layer in range(len(maps)):
        path = plot_position_maps(maps, tokens, out / f"layer{layer}.png", layer, f"{run_label(run)}")
        print(path)
