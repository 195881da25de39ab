"""Generation with a KV cache: for every encoding it equals decoding without one, token for token and logit for
logit; sampling is seeded; `cope-pl generate` streams a run's continuation and refuses bad input in one line."""

import io

import pytest
import torch

from cope_pl.data.codec import TokenIdCodec, VocabularyCodec
from cope_pl.generate import generate, main, print_stream
from cope_pl.position import available
from tests.conftest import fitted_run, tiny_model

ENCODINGS = available()


def random_model(position, **kwargs):
    """float64, eval mode, every position parameter drawn non-zero (zero CoPE tables would hide bugs)."""
    model = tiny_model(position, **kwargs).double().eval()
    with torch.no_grad():
        for p in model.position.parameters():
            torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.mark.parametrize("position", ENCODINGS)
def test_cached_greedy_decoding_equals_decoding_without_cache(position):
    model = random_model(position)
    prompt = torch.randint(0, 23, (2, 5))
    cached = generate(model, prompt, max_new_tokens=12)
    uncached = generate(model, prompt, max_new_tokens=12, use_cache=False)
    assert cached.shape == (2, 17) and torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("position", ENCODINGS)
def test_a_prefill_in_uneven_chunks_gives_the_full_forward_logits(position):
    model = random_model(position)
    ids = torch.randint(0, 23, (3, 17))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        chunks, start = [], 0
        for size in (5, 1, 3, 1, 7):  # a prefill, single tokens and further chunks
            chunks.append(model(ids[:, start : start + size], cache=cache))
            start += size
    assert cache.length == 17
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=0, atol=1e-9)


@pytest.mark.parametrize("position", ["cope_sepkeys", "rope_cope"])
def test_the_cache_holds_keys_values_and_gate_keys_per_layer(position):
    model = random_model(position)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 23, (1, 6)), cache=cache)
    names = set(cache.layers[0].buffers)
    assert names == ({"k", "v", "cope_gate_k"} if position == "cope_sepkeys" else {"k", "v"})


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = random_model("cope")
    prompt = torch.randint(0, 23, (2, 4))
    first = generate(model, prompt, 10, temperature=1.0, seed=3)
    assert torch.equal(first, generate(model, prompt, 10, temperature=1.0, seed=3))
    assert not torch.equal(first, generate(model, prompt, 10, temperature=1.0, seed=4))
    greedy = generate(model, prompt, 10)
    assert torch.equal(generate(model, prompt, 10, temperature=0.7, top_k=1, seed=0), greedy)
    assert torch.equal(generate(model, prompt, 10, temperature=0.7, top_p=1e-6, seed=0), greedy)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_ids": torch.zeros(1, 0, dtype=torch.long)}, "the prompt is empty"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}, "padded prompts are not supported"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
    ],
)
def test_bad_requests_are_refused(kwargs, message):
    args = {"prompt_ids": torch.ones(2, 3, dtype=torch.long), "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(tiny_model("rope"), **args)


@pytest.mark.parametrize("position, message", [("absolute", "model.max_seq_len=8"), ("relative", "raise max_distance")])
def test_a_table_without_cap_refuses_to_decode_past_its_length(position, message):
    model = tiny_model(position, max_seq_len=8)
    with pytest.raises(ValueError, match=message):
        generate(model, torch.ones(1, 6, dtype=torch.long), max_new_tokens=4)
    assert generate(model, torch.ones(1, 6, dtype=torch.long), max_new_tokens=3).shape == (1, 9)  # 8 positions fed


def test_codecs_refuse_text_outside_the_vocabulary():
    chars = VocabularyCodec("wri01", separator="", prefix=[5])
    assert chars.encode("w1r") == [5, 0, 4, 1] and chars.decode([5, 0, 4, 1, 4]) == "w1r1"
    with pytest.raises(ValueError, match=r"\['x'\] outside this task's vocabulary; use only 'wri01'"):
        chars.encode("w1x")
    with pytest.raises(ValueError, match="outside this task's vocabulary 0..5"):
        TokenIdCodec(6).encode("1 2 9")


def test_streamed_text_waits_for_whole_characters():
    pieces = {1: "a", 2: "\ufffd", 3: "é"}  # token 2 alone decodes to an incomplete character
    decode = lambda ids: "".join(pieces[i] for i in ids).replace("\ufffdé", "é")  # noqa: E731
    out = io.StringIO()
    assert print_stream(iter([torch.tensor([[1]]), torch.tensor([[2]]), torch.tensor([[3]])]), decode, out) == 3
    assert out.getvalue() == "aé\n"


@pytest.fixture(scope="module")
def flipflop_run(tmp_path_factory):
    """A run directory as `cope-pl fit` leaves it, for a tiny Flip-Flop CoPE model."""
    data = {"seq_len": 16, "batch_size": 8, "train_size": 16, "eval_size": 8}
    tmp = tmp_path_factory.mktemp("runs")
    return fitted_run(tmp, "flipflop-cope", "cope_pl.data.FlipFlopDataModule", data, "cope", steps=1)[0]


def test_the_tool_streams_a_continuation_in_the_task_vocabulary(flipflop_run, capsys):
    main([str(flipflop_run), "--prompt", "w1i0r", "--max-new-tokens", "5", "--temperature", "1", "--seed", "0"])
    out, err = capsys.readouterr()
    text = out.strip()
    assert (
        text.startswith("w1i0r") and 5 < len(text) <= 10 and set(text) <= set("wri01")
    )  # a sampled BOS prints nothing
    assert "5 tokens in" in err and "tokens/s" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "w1x"], "outside this task's vocabulary"),
        (["--prompt", "  "], "--prompt is empty"),
        (["--prompt", "w1", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    ],
)
def test_the_tool_refuses_bad_input(flipflop_run, args, message):
    with pytest.raises(ValueError, match=message):
        main([str(flipflop_run), *args])


def test_a_run_directory_without_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no"):
        main([str(tmp_path), "--prompt", "w1"])
