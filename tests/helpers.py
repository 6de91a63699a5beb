"""Helpers shared by the test modules: private checkpoint copies, file hashes, tensor edits,
MTP heads added to the tiny checkpoints (which transformers builds without one)."""

import hashlib
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

from checkpoints import Spec, text_fields


def copy_checkpoint(make_checkpoint, tmp_path, spec=Spec()) -> Path:
    """A private copy of a session fixture, safe to corrupt."""
    source, _ = make_checkpoint(spec)
    return Path(shutil.copytree(source, tmp_path / "checkpoint"))


def contents(directory: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `directory`."""
    return {
        str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


def rewrite_weights(file: Path, edit) -> None:
    """Rewrites a safetensors file with `edit(tensors)` applied, keeping its metadata."""
    tensors, metadata = mx.load(str(file), return_metadata=True)
    mx.eval(tensors)  # read everything before the file is overwritten
    edit(tensors)
    mx.save_safetensors(str(file), tensors, metadata=metadata)


def prompt(length=100, batch=1, seed=0) -> np.ndarray:
    """Random ids [batch, length] below the tiny tokenizer's special tokens (100 by default:
    longer than transformers' 64-token chunk)."""
    return np.random.default_rng(seed).integers(0, 496, size=(batch, length))


def reference_logits(torch_model, ids) -> np.ndarray:
    """transformers' logits [B, T, vocab] in float32."""
    with torch.no_grad():
        return torch_model(torch.tensor(ids)).logits.float().numpy()


def mtp_shapes(spec: Spec = Spec()) -> dict[str, tuple[int, ...]]:
    """The 15 tensors of an MTP head at the spec's dims (docs/ARCHITECTURE.md §6): fc [H, 2H];
    q_proj [2·nh·hd, H] (query and gate); one full-attention layer."""
    fields = text_fields(spec)
    H, I, hd = fields["hidden_size"], fields["intermediate_size"], fields["head_dim"]
    nh, nkv = fields["num_attention_heads"], fields["num_key_value_heads"]
    layer = "mtp.layers.0."
    return {
        "mtp.fc.weight": (H, 2 * H),
        "mtp.pre_fc_norm_embedding.weight": (H,),
        "mtp.pre_fc_norm_hidden.weight": (H,),
        "mtp.norm.weight": (H,),
        f"{layer}input_layernorm.weight": (H,),
        f"{layer}post_attention_layernorm.weight": (H,),
        f"{layer}self_attn.q_proj.weight": (2 * nh * hd, H),
        f"{layer}self_attn.k_proj.weight": (nkv * hd, H),
        f"{layer}self_attn.v_proj.weight": (nkv * hd, H),
        f"{layer}self_attn.o_proj.weight": (H, nh * hd),
        f"{layer}self_attn.q_norm.weight": (hd,),
        f"{layer}self_attn.k_norm.weight": (hd,),
        f"{layer}mlp.gate_proj.weight": (I, H),
        f"{layer}mlp.up_proj.weight": (I, H),
        f"{layer}mlp.down_proj.weight": (H, I),
    }


def mtp_tensors(spec: Spec = Spec(), seed: int = 0) -> dict[str, mx.array]:
    """A random MTP head in the Hugging Face convention (norms hold w of 1 + w), float32.
    Entries of 0.1·N(0, 1): the fc output and the attention and MLP branches have a scale of
    about 1 on normed inputs, so the head's logits are far from zero."""
    rng = np.random.default_rng(seed)
    return {
        name: mx.array(0.1 * rng.standard_normal(shape).astype(np.float32))
        for name, shape in mtp_shapes(spec).items()
    }


def add_mtp_head(directory: Path, tensors: dict[str, mx.array]) -> Path:
    """Writes `tensors` (mtp.*) into the single-file checkpoint in `directory`."""
    rewrite_weights(directory / "model.safetensors", lambda t: t.update(tensors))
    return directory
