"""CoPE's gates, the contextual positions p_ij they count and the attention they induce, per layer and head (paper
Figure 4).

The maps are what the model's own attention computed: `TransformerLM.record_attention` runs the model once
under `cope_pl.attention.recording()`, which keeps each layer's attention probabilities and, for CoPE terms,
its gates and positions p_ij (reverse cumulative sum of the sigmoid gates, which the model clamps at
npos_max - 1; the maps draw them unclamped, hatching where the clamp applies). Whatever op an encoding
normally runs on, the maps come from the same terms.

`cope-pl position-maps RUN --out DIR` draws them as PNGs (`layer<L>_len<T>.png`) for a test-set sample of
the run's data; `--length 2x` draws them at twice the training length, where encodings diverge most. The
default DIR, `<run>/position_maps/`, is where `cope-pl report` looks for maps to show.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from cope_pl.ops import causal_mask
from cope_pl.runs import POSITION_MAPS_DIR, load_config, resolve_run, run_label


def position_maps(model, input_ids: Tensor) -> list[dict[str, Tensor | None]]:
    """Per layer: {"attention": (B, H, T, T), "positions": (B, H, T, T) or None without CoPE}.

    model: a TransformerLM (or a LanguageModel wrapping one); input_ids: (B, T).
    """
    return getattr(model, "model", model).record_attention(input_ids)


IMPLEMENTATION_OPTIONS = ("compile", "impl")  # how an encoding is computed, not what it computes
TOKEN_LABELS_UP_TO = 48  # longer sequences get numeric position ticks


def row_normalised(attention: Tensor) -> Tensor:
    """(..., T, S) causal attention -> each query row divided by its maximum (paper Figure 4); NaN above the
    diagonal, so masked keys are drawn as blank rather than as zero attention."""
    t, s = attention.shape[-2:]
    scaled = attention / attention.amax(-1, keepdim=True).clamp_min(1e-30)
    return scaled.masked_fill(~causal_mask(t, s, attention.device), float("nan"))


def unclamped_positions(gates: Tensor) -> Tensor:
    """(..., T, S) gates, 0 on masked keys -> p_ij = sum_{t=j..i} g_it before any clamp: what the model would count
    with a table large enough; where it exceeds npos_max - 1 the model uses npos_max - 1."""
    return gates.flip(-1).cumsum(-1).flip(-1)  # (..., T, S)


def map_rows(record: dict) -> list[tuple[str, Tensor, str, tuple[float, float]]]:
    """(row name, (H, T, T) values with NaN on masked keys, colour bar label, (vmin, vmax)) for one layer: gates
    and unclamped positions with a CoPE term, then attention scaled to its row maximum. One scale per row, shared
    by its heads, so heads can be compared by colour."""
    attention = record["attention"][0].float().cpu()  # (H, T, T)
    t, s = attention.shape[-2:]
    masked = ~causal_mask(t, s)
    rows = []
    if record.get("gates") is not None:
        gates = record["gates"][0].float().cpu()  # (H, T, S)
        positions = unclamped_positions(gates).masked_fill(masked, float("nan"))
        top = max(float(torch.nan_to_num(positions, nan=0.0).max()), 1.0)
        rows.append(("gate g_ij", gates.masked_fill(masked, float("nan")), "gate g_ij = sigmoid(q_i·k_j)", (0.0, 1.0)))
        rows.append(("position p_ij", positions, "contextual position p_ij (unclamped)", (0.0, top)))
    elif record.get("positions") is not None:  # a record without gates: positions as the model used them
        positions = record["positions"][0].float().cpu().masked_fill(masked, float("nan"))
        top = max(float(torch.nan_to_num(positions, nan=0.0).max()), 1.0)
        rows.append(("position p_ij", positions, "contextual position p_ij", (0.0, top)))
    rows.append(("attention", row_normalised(attention), "attention / row max", (0.0, 1.0)))
    return rows


def plot_position_maps(maps: list[dict], tokens: list[str] | None, path: Path, layer: int, title: str = "") -> Path:
    """One PNG for one layer, one column per head: with a CoPE term, the gates g_ij and the positions p_ij they
    count (unclamped; hatched where p_ij > npos_max - 1, which the model clamps), then attention scaled to its row
    maximum (paper Figure 4). One colour bar per row. Axes carry the token text up to TOKEN_LABELS_UP_TO tokens,
    positions beyond."""
    from cope_pl.reporting.plots import pyplot

    plt = pyplot()
    record = maps[layer]
    rows = map_rows(record)
    heads, t = record["attention"].size(1), record["attention"].size(-1)
    size = max(2.6, min(5.0, t / 10))
    fig, axes = plt.subplots(
        len(rows), heads, figsize=(size * heads + 1.4, size * len(rows) + 0.8), squeeze=False, layout="constrained"
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="whitesmoke")  # masked (future) keys
    npos_max = record.get("npos_max")
    labelled = tokens is not None and t <= TOKEN_LABELS_UP_TO
    tick_size, label_size = ((6 if t <= 32 else 5), 8) if labelled else (7, 8)
    for r, (name, values, bar_label, (vmin, vmax)) in enumerate(rows):
        clamp = npos_max - 1 if name == "position p_ij" and npos_max and vmax > npos_max - 1 else None
        for head in range(heads):
            ax = axes[r][head]
            image = ax.imshow(values[head], cmap=cmap, interpolation="nearest", vmin=vmin, vmax=vmax)
            ax.set_title(f"{name}, head {head}", fontsize=8)
            if clamp is not None:
                over = torch.nan_to_num(values[head], nan=0.0) > clamp
                if over.any():
                    ax.contourf(over.float().numpy(), levels=[0.5, 1.5], colors="none", hatches=["////"])
                    ax.contour(over.float().numpy(), levels=[0.5], colors="white", linewidths=0.6)
            if labelled:
                ax.set_xticks(range(t), tokens, fontsize=tick_size, rotation=90)
                ax.set_yticks(range(t), tokens, fontsize=tick_size)
                ax.set_xlabel("key token j", fontsize=label_size)
                ax.set_ylabel("query token i", fontsize=label_size)
            else:
                ax.tick_params(labelsize=tick_size)
                ax.set_xlabel("key position j", fontsize=label_size)
                ax.set_ylabel("query position i", fontsize=label_size)
        if clamp is not None:
            bar_label += f"\nhatched: > npos_max - 1 = {clamp} (clamped)"
        bar = fig.colorbar(image, ax=list(axes[r]), fraction=0.02, pad=0.01)
        bar.set_label(bar_label, fontsize=label_size)
        bar.ax.tick_params(labelsize=tick_size + 1)
        if clamp is not None:
            bar.ax.axhline(clamp, color="red", linewidth=1.2)
    fig.suptitle(f"{title}, layer {layer}".lstrip(", "), fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def map_title(run: Path, encoding: str, sample: str, length: int, train_len: int) -> str:
    """'copy-cope/version_0: cope, test sample 0, 256 tokens (2x the training length 128)'."""
    scale = f" ({length / train_len:.3g}x the training length {train_len})" if train_len else ""
    return f"{run_label(run)}: {encoding}, {sample}, {length} tokens{scale}"


def encoding_name(hparams) -> str:
    """'relative (p_max=64)': the encoding and its options, from a model's hyperparameters."""
    options = {k: v for k, v in (hparams.get("position_options") or {}).items() if k not in IMPLEMENTATION_OPTIONS}
    settings = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{hparams.get('position', '?')}" + (f" ({settings})" if settings else "")


def token_strings(dm, ids: list[int]) -> list[str]:
    """Token text from the data module's tokenizer (text corpora), readable: spaces as '·', newlines as '↵', tabs
    as '→', bytes of a character split across tokens as <hex>; ids where there is no tokenizer."""
    tokenizer_path = Path(getattr(dm, "directory", "")) / "tokenizer.json"
    if not getattr(dm, "directory", None) or not tokenizer_path.is_file():
        return [str(i) for i in ids]
    from cope_pl.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    return [readable_token(tokenizer.id_to_token(i)) if tokenizer.id_to_token(i) else str(i) for i in ids]


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for (GPT-2's byte mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


BYTE_OF = byte_level_alphabet()
VISIBLE = {" ": "·", "\n": "↵", "\t": "→", "\r": "⏎"}


def readable_token(token: str) -> str:
    """A byte-level token ('Ċ' newline, 'Ġ' space) as the text it stands for, whitespace made visible."""
    if not all(c in BYTE_OF for c in token):  # a special token such as <|endoftext|>
        return token
    raw = bytes(BYTE_OF[c] for c in token)
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text:  # part of a multi-byte character
        return "".join(f"<{b:02x}>" if b >= 0x80 else VISIBLE.get(chr(b), chr(b)) for b in raw)
    return "".join(VISIBLE.get(c, c) for c in text)


def load_sample(run: Path, index: int, seq_len: int) -> tuple[Tensor, list[str]]:
    """(1, T) token ids of sample `index` of the run's test data at seq_len, and their strings."""
    from cope_pl.eval_context import datamodule_at, test_loaders

    dm = datamodule_at(load_config(run), seq_len, batch_size=index + 1)
    batch = next(iter(next(iter(test_loaders(dm).values()))))
    ids = batch["input_ids"][index : index + 1]
    return ids, token_strings(dm, ids[0].tolist())


def sample_input(run: Path, index: int, seq_len: int | None) -> Tensor:
    """(1, T) token ids: sample `index` of the run's test data (optionally at another length)."""
    from cope_pl.runs import train_seq_len

    return load_sample(run, index, seq_len or train_seq_len(load_config(run)))[0]


def main(argv: list[str] | None = None) -> None:
    from cope_pl.eval_context import parse_lengths
    from cope_pl.resume import load_trained
    from cope_pl.runs import train_seq_len

    parser = argparse.ArgumentParser(prog="cope-pl position-maps", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory or checkpoint file")
    parser.add_argument("--sample", type=int, default=0, help="index of the test sample to show")
    parser.add_argument(
        "--length", default=None, help="sequence length, e.g. 256 or 2x (the training length times 2); default 1x"
    )
    parser.add_argument("--tokens", default=None, help="space-separated token ids instead of a test sample")
    parser.add_argument("--out", type=Path, default=None, help="default: <run>/position_maps/")
    args = parser.parse_args(argv)
    run, ckpt = resolve_run(args.run)
    model = load_trained(ckpt)
    train_len = train_seq_len(load_config(run))
    if args.tokens:
        input_ids = torch.tensor([[int(t) for t in args.tokens.split()]])
        tokens, sample = [str(t) for t in input_ids[0].tolist()], "given tokens"
    else:
        length = parse_lengths([args.length or "1x"], train_len)[0]
        input_ids, tokens = load_sample(run, args.sample, length)
        sample = f"test sample {args.sample}"
    maps = position_maps(model, input_ids)
    out = args.out or run / POSITION_MAPS_DIR
    out.mkdir(parents=True, exist_ok=True)
    length = input_ids.size(1)
    title = map_title(run, encoding_name(model.hparams), sample, length, train_len)
    for layer in range(len(maps)):
        print(plot_position_maps(maps, tokens, out / f"layer{layer}_len{length}.png", layer, title))
