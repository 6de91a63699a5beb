"""Scoring and perplexity against transformers' log-softmax, and the perplexity command."""

import math

import numpy as np
import pytest
import torch

from qwen35_mlx import load, score
from qwen35_mlx.cli import main

from checkpoints import Spec
from metrics import relative_error

TEXT = (
    "The octopus has three hearts and blue blood. Two hearts pump blood to the gills, "
    "one to the rest of the body.\n"
)


def prompt(length=100, seed=0):
    return np.random.default_rng(seed).integers(0, 496, size=length)


def reference_logprobs(torch_model, ids, top_k=0):
    """log p(ids[i + 1] | ids[: i + 1]) [N - 1] from transformers' full-sequence logits, and
    the top_k (values, indices) [N - 1, k] of each position's distribution."""
    with torch.no_grad():
        logits = torch_model(torch.tensor(ids)[None]).logits[0, :-1].float()  # [N - 1, vocab]
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).numpy()
    top = logprobs.topk(top_k, dim=-1) if top_k else None
    return picked, top


@pytest.fixture(scope="module")
def tiny(make_checkpoint):
    directory, reference = make_checkpoint(Spec())
    model, tokenizer = load(directory)
    return directory, reference, model, tokenizer


@pytest.mark.parametrize("layout", ["causal", "conditional"])
def test_logprobs_and_perplexity_match_transformers(make_checkpoint, layout):
    directory, reference = make_checkpoint(Spec(layout=layout))
    model, tokenizer = load(directory)
    ids = prompt()
    expected, _ = reference_logprobs(reference, ids)
    result = score(model, tokenizer, ids)
    assert result.tokens == ids.tolist() and result.num_scored == len(ids) - 1
    assert relative_error(np.array(result.logprobs), expected) <= 1e-4
    expected_nll = -expected.astype(np.float64).sum()
    assert relative_error(result.nll, expected_nll) <= 1e-4
    assert relative_error(result.perplexity, math.exp(expected_nll / (len(ids) - 1))) <= 1e-4


def test_top_k_matches_transformers(tiny):
    _, reference, model, tokenizer = tiny
    ids = prompt(length=40)
    _, (top_values, top_indices) = reference_logprobs(reference, ids, top_k=5)
    result = score(model, tokenizer, ids, top_k=5, prefill_step_size=16)
    assert result.top_tokens.shape == result.top_logprobs.shape == (39, 5)
    np.testing.assert_array_equal(np.array(result.top_tokens), top_indices.numpy())
    assert relative_error(np.array(result.top_logprobs), top_values.numpy()) <= 1e-4


def test_chunked_scoring_equals_one_pass(tiny):
    _, _, model, tokenizer = tiny
    ids = prompt()  # 99 scored tokens: 19 chunks of 5 and one of 4
    calls = []
    chunked = score(
        model,
        tokenizer,
        ids,
        prefill_step_size=5,
        progress=lambda done, total: calls.append((done, total)),
    )
    whole = score(model, tokenizer, ids, prefill_step_size=2048)
    assert relative_error(np.array(chunked.logprobs), np.array(whole.logprobs)) <= 1e-5
    assert relative_error(chunked.nll, whole.nll) <= 1e-5
    assert calls == [(done, 99) for done in [*range(0, 99, 5), 99]]


def test_text_is_scored_as_its_tokens(tiny):
    _, reference, model, tokenizer = tiny
    ids = tokenizer.encode(TEXT)
    expected, _ = reference_logprobs(reference, ids)
    result = score(model, tokenizer, TEXT)
    assert result.tokens == ids
    assert relative_error(np.array(result.logprobs), expected) <= 1e-4


@pytest.mark.parametrize("bad", [-1, 512, 10**9])
def test_ids_outside_the_vocabulary_are_refused(tiny, bad):
    _, _, model, tokenizer = tiny
    ids = [1, 2, 3, bad, 4]
    with pytest.raises(ValueError, match=rf"token id {bad} at position 3 .*\[0, 512\)"):
        score(model, tokenizer, ids)


@pytest.mark.parametrize(
    "ids, message",
    [
        ([], "has 0 token"),
        ([7], "has 1 token"),
        ([1.5, 2], "a list of token ids"),
        ([[1, 2]], "a list of token ids"),
    ],
)
def test_unscorable_inputs_are_refused(tiny, ids, message):
    _, _, model, tokenizer = tiny
    with pytest.raises(ValueError, match=message):
        score(model, tokenizer, ids)


def test_text_longer_than_the_context_is_refused(make_checkpoint):
    directory, reference = make_checkpoint(Spec(max_position_embeddings=32))
    model, tokenizer = load(directory)
    ids = prompt(length=33)
    with pytest.raises(ValueError, match="33 tokens but the model's context window is 32"):
        score(model, tokenizer, ids)
    result = score(model, tokenizer, ids, max_tokens=32)  # the fix the error names
    expected, _ = reference_logprobs(reference, ids[:32])
    assert result.num_scored == 31
    assert relative_error(np.array(result.logprobs), expected) <= 1e-4


def test_perplexity_command_prints_what_the_api_computes(tiny, tmp_path, capsys):
    directory, _, model, tokenizer = tiny
    file = tmp_path / "text.txt"
    file.write_text(TEXT * 3, encoding="utf-8")
    expected = score(model, tokenizer, TEXT * 3, prefill_step_size=7, max_tokens=60)
    assert (
        main(
            [
                "perplexity",
                "--model",
                str(directory),
                "--file",
                str(file),
                "--prefill-step-size",
                "7",
                "--max-tokens",
                "60",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out == (
        f"tokens: 59 | mean NLL: {expected.mean_nll:.4f} | perplexity: {expected.perplexity:.4f}\n"
    )
    assert "scoring: 59/59 tokens (100%)" in err and "scoring: 7/59 tokens" in err


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 3)"),
        (b" \n\n", "the file is empty"),
    ],
)
def test_perplexity_command_refuses_a_bad_file(tiny, tmp_path, capsys, content, message):
    file = tmp_path / "text.txt"
    if content is not None:
        file.write_bytes(content)
    assert main(["perplexity", "--model", str(tiny[0]), "--file", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen35-mlx perplexity: error: ") and message in err
