"""Sample from a trained model: a prefill of the prompt, then one token at a time with a KV cache.

`generate(model, prompt_ids, max_new_tokens)` works for every position encoding: the cache keeps each
layer's keys and values (and CoPE's sep-keys gate keys); CoPE's gates for a new query run over all cached
keys, so a decode step over S cached tokens costs O(S) time and memory. Temperature 0 is greedy decoding.

`cope-pl generate RUN_DIR_OR_CKPT --prompt TEXT` loads a run's model and its data's codec (the BPE of a text
corpus, the vocabulary of a synthetic task), streams the continuation to stdout and reports tokens/s on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor


def check_request(prompt_ids: Tensor, max_new_tokens: int, temperature: float, top_k, top_p) -> None:
    if prompt_ids.dim() != 2 or prompt_ids.dtype != torch.long:
        raise ValueError(
            f"prompt_ids must be a (batch, length) long tensor, got {tuple(prompt_ids.shape)} {prompt_ids.dtype}"
        )
    if prompt_ids.size(1) == 0:
        raise ValueError("the prompt is empty: give at least one token (--prompt TEXT)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def next_token(logits: Tensor, temperature: float, top_k, top_p, generator) -> Tensor:
    """(B, V) logits of the last position -> (B, 1) token ids."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


@torch.no_grad()
def stream(
    model,
    prompt_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[Tensor]:
    """Yield the (B, 1) new tokens one step at a time (see `generate`)."""
    check_request(prompt_ids, max_new_tokens, temperature, top_k, top_p)
    lm = getattr(model, "model", model)  # a LanguageModel wraps the TransformerLM
    was_training = lm.training
    lm.eval()
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    ids = prompt_ids.to(lm.lm_head.weight.device)
    cache = lm.new_cache() if use_cache else None
    try:
        logits = lm(ids, cache=cache)[:, -1]  # prefill
        for step in range(max_new_tokens):
            token = next_token(logits, temperature, top_k, top_p, generator)
            yield token
            if step + 1 == max_new_tokens:
                break
            ids = torch.cat([ids, token], dim=1)
            logits = (lm(token, cache=cache) if use_cache else lm(ids))[:, -1]
    finally:
        lm.train(was_training)


def generate(
    model,
    prompt_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Continue each prompt: (B, P) ids -> (B, P + max_new_tokens) ids.

    model: a TransformerLM (or a LanguageModel wrapping one). temperature 0 is greedy; otherwise tokens are
    sampled from softmax(logits / temperature), optionally restricted to the top_k tokens or to the smallest set
    whose probability reaches top_p, with a generator seeded by `seed`. Prompts in a batch have one length:
    padded prompts (an attention_mask with zeros) are refused, since no position encoding here can skip pads.
    """
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("padded prompts are not supported: generate prompts of different lengths in separate calls")
    new = list(stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, use_cache))
    return torch.cat([prompt_ids.to(new[0].device), *new], dim=1)


def load_run(target: str):
    """(model, codec, run directory) of a run directory or checkpoint file."""
    from cope_pl.resume import load_trained
    from cope_pl.runs import build_datamodule, load_config, resolve_run

    run, ckpt = resolve_run(target)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_trained(ckpt, map_location=device)
    return model, build_datamodule(load_config(run)).text_codec(), run


def print_stream(tokens: Iterator[Tensor], decode: Callable[[list[int]], str], out=None) -> int:
    """Write the decoded text as it grows (a byte-level BPE may need several tokens for one character)."""
    out = out or sys.stdout
    ids: list[int] = []
    shown = ""
    for token in tokens:
        ids.append(int(token[0, 0]))
        text = decode(ids)
        if text.startswith(shown) and not text.endswith("\ufffd"):  # U+FFFD: an incomplete UTF-8 sequence
            out.write(text[len(shown) :])
            out.flush()
            shown = text
    out.write(decode(ids)[len(shown) :] + "\n")
    return len(ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cope-pl generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory (its last.ckpt) or checkpoint file")
    parser.add_argument("--prompt", required=True, help="text in the run's data format (task vocabulary or BPE)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every step")
    args = parser.parse_args(argv)
    if not args.prompt.strip():
        raise ValueError("--prompt is empty: give the text to continue")
    check_request(torch.zeros(1, 1, dtype=torch.long), args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    model, codec, _ = load_run(args.run)
    prompt = torch.tensor([codec.encode(args.prompt)], dtype=torch.long)
    start = time.perf_counter()
    tokens = stream(
        model,
        prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        use_cache=not args.no_cache,
    )
    sys.stdout.write(args.prompt)
    count = print_stream(tokens, codec.decode)
    seconds = time.perf_counter() - start
    print(
        f"{count} tokens in {seconds:.2f} s ({count / seconds:.1f} tokens/s, prompt {prompt.size(1)} tokens, "
        f"{'no cache' if args.no_cache else 'KV cache'})",
        file=sys.stderr,
    )
