"""Whether a model with a position encoding, as its config file sets it up, starts learning the copy task.

The copy task looks exactly `prefix` tokens back. An encoding whose recency prior at initialisation gives such
keys almost no attention (and so almost no gradient) stays at the loss of a uniform guess, ln 16 = 2.77.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from cope_pl.data.copy_task import CopySequences
from cope_pl.model import TransformerLM

ROOT = Path(__file__).resolve().parents[1]


def config_position(path: str) -> tuple[str, dict]:
    """model.position and model.position_options of a configs/position file."""
    model = yaml.safe_load((ROOT / path).read_text())["model"]
    return model["position"], model.get("position_options") or {}


def copy_loss_after_training(position: str, options: dict, prefix: int = 8, steps: int = 300) -> float:
    """Mean training loss over the last 20 of `steps` AdamW steps (16 sequences each) of a 2-layer, d_model 32
    model on copying `prefix` of 16 symbols."""
    torch.manual_seed(0)
    model = TransformerLM(17, n_layers=2, d_model=32, n_heads=4, max_seq_len=4 * prefix, position=position,
                          position_options=options)  # fmt: skip
    data = CopySequences(16 * steps, prefix, num_symbols=16, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        items = [data[i] for i in range(16 * step, 16 * step + 16)]
        x, y = (torch.stack([item[key] for item in items]) for key in ("input_ids", "labels"))  # (16, 2 * prefix)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20
