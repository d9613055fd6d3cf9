"""A Vision Transformer (ViT-B/16 by default) in Flax NNX.

The architecture follows timm's ``VisionTransformer`` with class-token
pooling: a strided convolution cuts the image into patches, a learned class
token and position embeddings are added, pre-LN encoder blocks (attention and
an exact-GELU MLP) follow, then a final LayerNorm and a linear classification
head on the class token.  Attention and MLP projections are plain
:class:`flax.nnx.Linear` modules, so a module-swapping sparsifier can replace
them; the patch embedding is an ``nnx.Conv`` and is left alone by such tools.

Images are NHWC float arrays (JAX's convention), already normalised.
Models are randomly initialised unless loaded with :func:`load_vit` from a
safetensors checkpoint in timm or Hugging Face layout.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from model_utils import SelfAttention, build_model, jit_method, linear_gelu


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture hyper-parameters (defaults: ViT-B/16 at 224x224, 1000 classes)."""

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    layer_norm_eps: float = 1e-6  # timm; Hugging Face ViT checkpoints use 1e-12

    @property
    def num_patches(self) -> int:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        return (self.image_size // self.patch_size) ** 2


VIT_B16 = ViTConfig()


class EncoderBlock(nnx.Module):
    """Pre-LN block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
        self.attention = SelfAttention(d, config.num_heads, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
        self.fc1 = nnx.Linear(d, config.mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(config.mlp_dim, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(linear_gelu(self.fc1, self.norm2(x)))


class ViT(nnx.Module):
    """Vision Transformer classifier: images [batch, H, W, C] -> logits [batch, classes]."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        d, p = config.hidden_size, config.patch_size
        self.config = config
        self.patch_embed = nnx.Conv(config.in_channels, d, kernel_size=(p, p), strides=(p, p),
                                    padding="VALID", rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, d), jnp.float32))
        self.pos_embed = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (1, config.num_patches + 1, d), jnp.float32))
        self.blocks = nnx.List([EncoderBlock(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)
        self.head = nnx.Linear(d, config.num_classes, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.patch_embed(images)  # [batch, H/p, W/p, hidden]
        b, d = x.shape[0], x.shape[-1]
        x = x.reshape(b, -1, d)  # row-major patch order, as timm's flatten(2)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


# --------------------------------------------------------------------------
# Loading checkpoints
# --------------------------------------------------------------------------

def _linear(tensors, prefix: str, dst: str) -> dict[str, np.ndarray]:
    """torch ``Linear`` [out, in] weight + bias -> nnx.Linear [in, out] kernel + bias."""
    return {f"{dst}.kernel": tensors[f"{prefix}.weight"].T, f"{dst}.bias": tensors[f"{prefix}.bias"]}


def _norm(tensors, prefix: str, dst: str) -> dict[str, np.ndarray]:
    return {f"{dst}.scale": tensors[f"{prefix}.weight"], f"{dst}.bias": tensors[f"{prefix}.bias"]}


def _conv(tensors, prefix: str, dst: str) -> dict[str, np.ndarray]:
    """torch ``Conv2d`` [out, in, kh, kw] -> nnx.Conv [kh, kw, in, out]."""
    return {f"{dst}.kernel": tensors[f"{prefix}.weight"].transpose(2, 3, 1, 0),
            f"{dst}.bias": tensors[f"{prefix}.bias"]}


def _timm_params(t, config: ViTConfig) -> dict[str, np.ndarray]:
    d = config.hidden_size
    params = {"cls_token": t["cls_token"], "pos_embed": t["pos_embed"],
              **_conv(t, "patch_embed.proj", "patch_embed"),
              **_norm(t, "norm", "norm"), **_linear(t, "head", "head")}
    for i in range(config.num_layers):
        src, dst = f"blocks.{i}", f"blocks.{i}"
        # timm fuses q, k, v into one [3 * hidden, hidden] projection, in that order.
        qkv_w, qkv_b = t[f"{src}.attn.qkv.weight"], t[f"{src}.attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            params[f"{dst}.attention.{name}.kernel"] = qkv_w[j * d:(j + 1) * d].T
            params[f"{dst}.attention.{name}.bias"] = qkv_b[j * d:(j + 1) * d]
        params.update(_linear(t, f"{src}.attn.proj", f"{dst}.attention.output"))
        params.update(_norm(t, f"{src}.norm1", f"{dst}.norm1"))
        params.update(_norm(t, f"{src}.norm2", f"{dst}.norm2"))
        params.update(_linear(t, f"{src}.mlp.fc1", f"{dst}.fc1"))
        params.update(_linear(t, f"{src}.mlp.fc2", f"{dst}.fc2"))
    return params


def _hf_params(t, config: ViTConfig) -> dict[str, np.ndarray]:
    params = {"cls_token": t["vit.embeddings.cls_token"],
              "pos_embed": t["vit.embeddings.position_embeddings"],
              **_conv(t, "vit.embeddings.patch_embeddings.projection", "patch_embed"),
              **_norm(t, "vit.layernorm", "norm"), **_linear(t, "classifier", "head")}
    for i in range(config.num_layers):
        src, dst = f"vit.encoder.layer.{i}", f"blocks.{i}"
        for name in ("query", "key", "value"):
            params.update(_linear(t, f"{src}.attention.attention.{name}",
                                  f"{dst}.attention.{name}"))
        params.update(_linear(t, f"{src}.attention.output.dense", f"{dst}.attention.output"))
        params.update(_norm(t, f"{src}.layernorm_before", f"{dst}.norm1"))
        params.update(_norm(t, f"{src}.layernorm_after", f"{dst}.norm2"))
        params.update(_linear(t, f"{src}.intermediate.dense", f"{dst}.fc1"))
        params.update(_linear(t, f"{src}.output.dense", f"{dst}.fc2"))
    return params


def load_vit(path: str | Path, config: ViTConfig = VIT_B16) -> ViT:
    """Build a :class:`ViT` from a safetensors checkpoint.

    ``path`` is a ``.safetensors`` file or a directory holding
    ``model.safetensors``.  The layout is detected from the tensor names:
    timm (``patch_embed.proj.weight``, ``blocks.N.attn.qkv.weight``, ...) or
    Hugging Face ``ViTForImageClassification`` (``vit.embeddings...``,
    ``classifier.weight``).  ``config`` must describe the checkpoint (pick
    ``layer_norm_eps`` to match its origin); shapes are checked, position
    embeddings are not interpolated.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    tensors = load_file(str(path))
    if "cls_token" in tensors:
        layout, to_params = "timm", _timm_params
    elif "vit.embeddings.cls_token" in tensors:
        layout, to_params = "Hugging Face", _hf_params
    else:
        raise KeyError(f"{path}: neither a timm nor a Hugging Face ViT checkpoint "
                       "(no 'cls_token' or 'vit.embeddings.cls_token')")
    try:
        params = to_params(tensors, config)
    except KeyError as missing:
        raise KeyError(f"{path}: {layout} checkpoint lacks {missing.args[0]!r}") from None
    return build_model(lambda: ViT(config, rngs=nnx.Rngs(0)), params, str(path))


def throughput_call(model: ViT, batch_size: int, *, seed: int = 0):
    """``(fn, args)``: the jit-compiled forward pass on random images."""
    c = model.config
    images = jax.random.normal(jax.random.key(seed),
                               (batch_size, c.image_size, c.image_size, c.in_channels), jnp.float32)
    return jit_method(model, "__call__"), (images,)
