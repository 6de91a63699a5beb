"""The MTP head (docs/ARCHITECTURE.md §6): parity with a reference built from transformers' own
Qwen3.5 modules (transformers has no MTP code), through the KV cache too; loading (no head, a
partial head, our conversions); first use on another thread; the trained-head fixture."""

import itertools
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from transformers import Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    Qwen3_5DecoderLayer,
    Qwen3_5RMSNorm,
    Qwen3_5TextRotaryEmbedding,
)

from qwen35_mlx.convert import convert
from qwen35_mlx.loading import CheckpointError, load_model

from checkpoints import Spec, text_fields
from helpers import add_mtp_head, copy_checkpoint, mtp_tensors, prompt
from metrics import relative_error
from mtp_training import held_out_accuracy

SPECS = [
    Spec(layout=layout, tied=tied)
    for layout, tied in itertools.product(("causal", "conditional"), (False, True))
]
T = 12  # tokens; the head sees T - 1 pairs (h_t, x_{t+1})


class ReferenceMTP(torch.nn.Module):
    """The MTP head of vLLM's `qwen3_5_mtp.py` from transformers' modules, float32: (1+w) norms,
    fc over [embedding ‖ hidden], one full-attention decoder layer, a final norm."""

    def __init__(self, spec: Spec, weights: dict[str, mx.array]):
        super().__init__()
        config = Qwen3_5TextConfig(**text_fields(spec))
        config._attn_implementation = "eager"
        H, eps = config.hidden_size, config.rms_norm_eps
        self.pre_fc_norm_embedding = Qwen3_5RMSNorm(H, eps)
        self.pre_fc_norm_hidden = Qwen3_5RMSNorm(H, eps)
        self.fc = torch.nn.Linear(2 * H, H, bias=False)
        # a decoder layer is full attention by its index in layer_types
        full = config.layer_types.index("full_attention")
        self.layers = torch.nn.ModuleList([Qwen3_5DecoderLayer(config, full)])
        self.norm = Qwen3_5RMSNorm(H, eps)
        self.rotary = Qwen3_5TextRotaryEmbedding(config)
        state = {k[len("mtp.") :]: torch.tensor(np.array(v)) for k, v in weights.items()}
        self.load_state_dict(state)

    @torch.no_grad()
    def forward(self, hidden, embeddings, position_ids):
        """hidden, embeddings [B, T, H]; position_ids [3, B, T] -> [B, T, H]."""
        joined = torch.cat(
            [self.pre_fc_norm_embedding(embeddings), self.pre_fc_norm_hidden(hidden)], dim=-1
        )
        h = self.fc(joined)
        length = h.shape[1]
        mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
        rotary = self.rotary(h, position_ids)
        for layer in self.layers:
            h = layer(h, position_embeddings=rotary, attention_mask=mask)
        return self.norm(h)


def reference_mtp_logits(reference, spec, ids, position_ids) -> np.ndarray:
    """Logits [B, T-1, vocab] for x_{t+2}: transformers' main model gives the final-normed
    hidden states and the embeddings, the reference head drafts, the main model's head
    scores."""
    ids = torch.tensor(ids)
    with torch.no_grad():
        hidden = reference.model(input_ids=ids).last_hidden_state  # [B, T, H]
        embeddings = reference.get_input_embeddings()(ids[:, 1:])
        drafted = ReferenceMTP(spec, mtp_tensors(spec))(
            hidden[:, :-1], embeddings, torch.tensor(np.array(position_ids))
        )
        return reference.get_output_embeddings()(drafted).numpy()


@pytest.fixture(scope="module")
def with_head(make_checkpoint, tmp_path_factory):
    """with_head(spec) -> (a copy of the tiny checkpoint with a random MTP head, torch model)."""
    built = {}

    def make(spec):
        if spec not in built:
            directory = copy_checkpoint(make_checkpoint, tmp_path_factory.mktemp("mtp"), spec)
            built[spec] = (add_mtp_head(directory, mtp_tensors(spec)), make_checkpoint(spec)[1])
        return built[spec]

    return make


def text_positions(length: int, start: int = 0) -> mx.array:
    return mx.broadcast_to(mx.arange(start, start + length), (3, 1, length))


def our_hidden(model, ids) -> mx.array:
    _, hidden = model(mx.array(ids), return_hidden=True)
    return hidden


# ---------------------------------------------------------------------------------------------
# 1. Parity with the reference.


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_logits_match_reference(with_head, spec):
    directory, reference = with_head(spec)
    model = load_model(directory)
    ids = prompt(length=T, batch=2)
    ours = model.mtp_logits(our_hidden(model, ids)[:, :-1], mx.array(ids[:, 1:]))
    expected = reference_mtp_logits(reference, spec, ids, text_positions(T - 1))
    assert np.abs(expected).mean() > 1  # far from zero: the comparison means something
    assert relative_error(np.array(ours), expected) <= 1e-4


# Positions of a prompt whose pairs 1..3 are an image's (rows T, H, W, as `rope_index` gives
# them); the text after it continues at max + 1 = 3: cache offset 4 plus rope_delta -1.
PREFILL_POSITIONS = [[0, 1, 1, 1], [0, 1, 1, 2], [0, 1, 2, 1]]
ROPE_DELTA = -1


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_cached_steps_match_reference(with_head, spec):
    # a prefill of 4 pairs at M-RoPE positions, then one pair at a time at offset + rope_delta
    directory, reference = with_head(spec)
    model = load_model(directory)
    ids = prompt(length=T, seed=1)
    hidden, cache = our_hidden(model, ids), model.mtp.make_cache()
    prefill = mx.array(PREFILL_POSITIONS)[:, None]  # [3, 1, 4]
    steps = [model.mtp_logits(hidden[:, :4], mx.array(ids[:, 1:5]), cache, prefill)]
    for t in range(4, T - 1):
        steps.append(
            model.mtp_logits(
                hidden[:, t : t + 1], mx.array(ids[:, t + 1 : t + 2]), cache, None, ROPE_DELTA
            )
        )
    assert cache[0].offset == T - 1
    positions = mx.concatenate([prefill, text_positions(T - 5, 4 + ROPE_DELTA)], axis=2)
    expected = reference_mtp_logits(reference, spec, ids, positions)
    assert relative_error(np.array(mx.concatenate(steps, axis=1)), expected) <= 1e-4


def test_mrope_positions_match_reference(with_head):
    # three different position rows, as a prompt with an image gives them
    spec = Spec(layout="conditional")
    directory, reference = with_head(spec)
    model = load_model(directory)
    ids = prompt(length=T, seed=2)
    t = np.arange(T - 1)
    position_ids = mx.array(np.stack([t, t // 2, t % 3])[:, None])  # [3, 1, T-1]
    ours = model.mtp_logits(
        our_hidden(model, ids)[:, :-1], mx.array(ids[:, 1:]), position_ids=position_ids
    )
    expected = reference_mtp_logits(reference, spec, ids, position_ids)
    assert relative_error(np.array(ours), expected) <= 1e-4


# ---------------------------------------------------------------------------------------------
# 2. Loading.


def test_no_head_without_mtp_tensors(make_checkpoint):
    model = load_model(make_checkpoint(Spec())[0])
    assert model.mtp is None
    with pytest.raises(ValueError, match="no MTP head"):
        model.mtp_logits(mx.zeros((1, 1, 64)), mx.zeros((1, 1), mx.int32))


def test_head_holds_the_checkpoint_tensors(with_head):
    directory, _ = with_head(Spec())
    loaded = dict(tree_flatten(load_model(directory).mtp.parameters()))
    expected = mtp_tensors(Spec())
    assert {f"mtp.{k}" for k in loaded} == set(expected)
    for name, value in expected.items():
        shifted = value + 1.0 if "norm" in name else value  # all MTP norms are (1+w)
        assert mx.array_equal(loaded[name[len("mtp.") :]], shifted).item(), name


def test_partial_head_names_what_is_missing(make_checkpoint, tmp_path):
    directory = copy_checkpoint(make_checkpoint, tmp_path)
    missing = ["mtp.layers.0.self_attn.k_norm.weight", "mtp.norm.weight"]
    tensors = {k: v for k, v in mtp_tensors().items() if k not in missing}
    add_mtp_head(directory, tensors)
    with pytest.raises(CheckpointError) as raised:
        load_model(directory)
    assert f"the MTP head is incomplete, 2 of its 15 tensor(s) are missing: {missing}" in str(
        raised.value
    )


def test_bfloat16_head_keeps_its_norms_float32(with_head):
    model = load_model(with_head(Spec())[0], dtype="bfloat16")
    dtypes = {name: value.dtype for name, value in tree_flatten(model.mtp.parameters())}
    assert {name for name, dtype in dtypes.items() if dtype == mx.float32} == {
        "pre_fc_norm_embedding.weight",
        "pre_fc_norm_hidden.weight",
        "norm.weight",
        "layers.0.input_layernorm.weight",
        "layers.0.post_attention_layernorm.weight",
        "layers.0.self_attn.q_norm.weight",
        "layers.0.self_attn.k_norm.weight",
    }
    assert dtypes["fc.weight"] == mx.bfloat16


# Measured: 0.107 for this 4-bit head (groups of 32) of 0.1·N(0, 1) weights, the size of
# the errors of its 8 matrices rounded to 4 bits (0.08 each) compounding through the layer;
# 0.15 leaves room for other platforms.
MAX_Q4_HEAD_ERROR = 0.15


@pytest.fixture(scope="module")
def conversions(with_head, tmp_path_factory):
    """(source, float conversion, 4-bit conversion with a 4-bit MTP head) of Spec()."""
    source, _ = with_head(Spec())
    out = tmp_path_factory.mktemp("converted")
    float32 = convert(str(source), str(out / "float"), dtype="float32", verify_output=False)
    q4 = convert(
        str(source),
        str(out / "q4"),
        quantize=True,
        q_bits=4,
        q_group_size=32,
        quantize_mtp=True,
        dtype="float32",
        verify_output=False,
    )
    return source, float32, q4


def test_float_conversion_keeps_the_head(conversions):
    source, float32, _ = conversions
    ids = prompt(length=T)
    logits = [
        model.mtp_logits(our_hidden(model, ids)[:, :-1], mx.array(ids[:, 1:]))
        for model in (load_model(source), load_model(float32))
    ]
    assert mx.array_equal(*logits).item()


def test_quantized_head_stays_close_to_float(conversions):
    # the head alone: the float model's hidden states, embeddings and head around both heads
    source, _, q4 = conversions
    ids = prompt(length=T)
    reference, quantized = load_model(source), load_model(q4)
    assert isinstance(quantized.mtp.fc, nn.QuantizedLinear)
    assert isinstance(quantized.mtp.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    hidden = our_hidden(reference, ids)[:, :-1]
    embeddings = reference.language_model.model.embed_tokens(mx.array(ids[:, 1:]))
    head = reference.language_model.head
    q4_logits, float_logits = (
        np.array(head(model.mtp(hidden, embeddings))) for model in (quantized, reference)
    )
    assert relative_error(q4_logits, float_logits) <= MAX_Q4_HEAD_ERROR


# ---------------------------------------------------------------------------------------------
# 3. Read on first use, on any thread.


def test_head_first_used_on_another_thread(with_head):
    directory, _ = with_head(Spec())
    ids = prompt(length=T)
    model = load_model(directory)
    hidden = our_hidden(model, ids)[:, :-1]
    mx.eval(hidden)
    outcome = {}

    def first_use():
        try:
            outcome["logits"] = np.array(model.mtp_logits(hidden, mx.array(ids[:, 1:])))
        except Exception as error:  # handed to the test thread
            outcome["error"] = error

    worker = threading.Thread(target=first_use)
    worker.start()
    worker.join()
    assert "error" not in outcome, outcome.get("error")
    fresh = load_model(directory)
    expected = np.array(fresh.mtp_logits(hidden, mx.array(ids[:, 1:])))
    assert np.array_equal(outcome["logits"], expected)


# ---------------------------------------------------------------------------------------------
# 4. The trained head other tests draft with.


def test_trained_head_predicts_the_token_two_ahead(trained_mtp_checkpoint):
    model = load_model(trained_mtp_checkpoint())
    assert held_out_accuracy(model) > 0.5
