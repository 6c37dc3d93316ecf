"""VisionLlama (Llama 3.2 Vision's text model with gated cross-attention) against transformers'
MllamaForConditionalGeneration on random tiny models, fp32; the cache (image keys/values computed once at
prefill) against the full forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import LlamaConfig
from llama_jax.model import mllama, spec
from llama_jax.model.mllama import VisionLlama
from llama_jax.model.transformer import init_cache, traced_param_tree
from mllama_util import make_hf_mllama, params_from_hf, random_images

torch = pytest.importorskip("torch")

TINY = LlamaConfig.from_preset("tiny-vision")  # GQA (4 heads, 2 kv), 2 self layers, cross layer at HF index 1
# cross layers first and last, multi-head attention (no grouping)
EDGES = TINY.replace(cross_attention_layers=(0, 3), num_kv_heads=4)
IMAGE = TINY.image_token_id


def _prompt(length: int, image_at, seed: int):
    """Token ids [T] with <|image|> at the positions `image_at`; the rest random text ids."""
    ids = np.random.default_rng(seed).integers(3, TINY.vocab_size, length)
    ids[list(image_at)] = IMAGE
    return ids


def _mask(length: int, image_at, tiles, max_images: int, max_tiles: int):
    """A processor-like cross_attention_mask [T, I, X]: image k is seen (its real tiles) from its token on."""
    m = np.zeros((length, max_images, max_tiles), np.int64)
    for k, (pos, n) in enumerate(zip(image_at, tiles)):
        m[pos:, k, :n] = 1
    return m


def _batch(rows, length: int, seed: int = 0, images: int = 2):
    """rows: [(image positions, tiles per image)] -> tokens [B, T], image arrays (padded to `images` per row, as
    the processor pads: id 0, zero pixels), cross_attention_mask."""
    tiles = [list(t) + [1] * (images - len(t)) for _, t in rows]
    pixels, ids, ar_mask = random_images(TINY, tiles, seed=seed)
    for r, (_, t) in enumerate(rows):
        pixels[r, len(t):], ids[r, len(t):] = 0, 0
        ar_mask[r, len(t):] = 0
        ar_mask[r, len(t):, 0] = 1
    tokens = np.stack([_prompt(length, at, seed + r) for r, (at, _) in enumerate(rows)])
    x = TINY.vision.max_num_tiles
    cross = np.stack([_mask(length, at, t, pixels.shape[1], x) for at, t in rows])
    return tokens, dict(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=ar_mask,
                        cross_attention_mask=cross)


LENGTH = 9
# Every case is 2 rows x 2 images x LENGTH tokens, so one compiled forward per config serves them all (and the
# decoding test's full forward). (image positions, tiles per image) per row; () is a row without images.
CASES = {
    "one image of one tile; two images of 2 and 3 tiles": [((1,), (1,)), ((0, 5), (2, 3))],
    "text before an image of 4 tiles; a row without images": [((3,), (4,)), ((), ())],
}


@pytest.fixture(scope="module", params=["tiny", "edges"])
def pair(request):
    """(config, transformers model, our params, our jitted forward)."""
    config = {"tiny": TINY, "edges": EDGES}[request.param]
    hf = make_hf_mllama(config, seed=1)
    forward = jax.jit(lambda p, t, images: VisionLlama(config).apply({"params": p}, t, **images))
    return config, hf, jax.tree.map(jnp.asarray, params_from_hf(hf, config)), forward


def _hf_logits(hf, tokens, images=None):
    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in (images or {}).items()}
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(tokens), **kwargs).logits.numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(pair, case):
    config, hf, params, forward = pair
    tokens, images = _batch(CASES[case], LENGTH)
    ours = forward(params, jnp.asarray(tokens), images)
    np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf, tokens, images), atol=1e-4, rtol=1e-4)


def test_text_only_matches_transformers(pair):
    config, hf, params, forward = pair
    tokens = np.stack([_prompt(7, (), 0), _prompt(7, (), 1)])
    ours = forward(params, jnp.asarray(tokens), {})
    np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf, tokens), atol=1e-4, rtol=1e-4)


def test_gates_matter(pair):
    """The comparisons above can fail: the images change the logits, and so does each cross layer's gate."""
    config, _, params, forward = pair
    tokens, images = _batch(CASES["text before an image of 4 tiles; a row without images"], LENGTH)
    with_images = np.asarray(forward(params, jnp.asarray(tokens), images))
    without = np.asarray(forward(params, jnp.asarray(tokens), {}))
    assert np.abs(with_images[0] - without[0]).max() > 1e-3
    for gate in ("attn_gate", "mlp_gate"):
        cross = dict(params["cross_layers"], **{gate: jnp.zeros_like(params["cross_layers"][gate])})
        changed = np.asarray(forward(dict(params, cross_layers=cross), jnp.asarray(tokens), images))
        assert np.abs(changed - with_images).max() > 1e-3, gate


def test_layer_runs():
    assert mllama.layer_runs(TINY) == [("self", 0, 1), ("cross", 0, None), ("self", 1, 2)]
    assert mllama.layer_runs(EDGES) == [("cross", 0, None), ("self", 0, 2), ("cross", 1, None)]
    eleven = LlamaConfig.from_preset("llama3.2-11b-vision")
    runs = mllama.layer_runs(eleven)
    assert [b - a for kind, a, b in runs if kind == "self"] == [3, 4, 4, 4, 4, 4, 4, 4, 1]


def test_param_tree_equals_spec():
    shapes, axes = traced_param_tree(EDGES)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == \
        jax.tree.map(lambda s: (s.shape, s.dtype), spec.param_shapes(EDGES))
    assert axes == spec.logical_axes(EDGES)


def test_cached_greedy_decoding_equals_full_forward(pair):
    """Prefill with the images (their keys/values computed once, into the cache), then greedy decode steps that
    pass no image: each step's logits and token equal the full forward's over the whole sequence (causal: its
    logits at position t are those of the prefix up to t), with the mask's last row repeated as transformers'
    generate does."""
    config, _, params, forward = pair
    if config is TINY:
        pytest.skip("decoding runs on EDGES: cross layers first and last (one compile per config saved)")
    steps, plen = 4, LENGTH - 4
    tokens, images = _batch(CASES["one image of one tile; two images of 2 and 3 tiles"], LENGTH, seed=3)
    prompt_images = dict(images, cross_attention_mask=images["cross_attention_mask"][:, :plen])
    model = VisionLlama(config)
    cache = init_cache(config, 2, LENGTH, num_images=2)
    logits, cache = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c, cache_index=0,
                                                        **prompt_images))(params, jnp.asarray(tokens[:, :plen]), cache)
    step = jax.jit(lambda p, t, c, i: model.apply({"params": p}, t, cache=c, cache_index=i))
    seq, cached = tokens[:, :plen], [logits[:, -1]]
    for i in range(steps):
        token = np.asarray(jnp.argmax(cached[-1], axis=-1))
        seq = np.concatenate([seq, token[:, None]], axis=1)
        logits, cache = step(params, jnp.asarray(token[:, None]), cache, plen + i)
        cached.append(logits[:, -1])
    cross = images["cross_attention_mask"][:, :plen]
    cross = np.concatenate([cross] + [cross[:, -1:]] * steps, axis=1)
    full = np.asarray(forward(params, jnp.asarray(seq), dict(images, cross_attention_mask=cross)))
    np.testing.assert_allclose(np.stack([np.asarray(c) for c in cached], 1), full[:, plen - 1:], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(full[:, plen - 1:-1].argmax(-1), seq[:, plen:])


def test_tied_config_reads_as_transformers_runs_it(tmp_path):
    """A config.json saying tie_word_embeddings=true: transformers still keeps Mllama's head apart (the
    embedding has the image rows), so we read it untied and give transformers' logits."""
    import transformers

    d = TINY.to_hf_dict()
    d["tie_word_embeddings"] = True
    d["text_config"]["tie_word_embeddings"] = True
    torch.manual_seed(3)
    hf = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(**d)).eval()
    head, embed = hf.lm_head.weight.detach().numpy(), hf.model.language_model.embed_tokens.weight.detach().numpy()
    assert head.shape[0] == TINY.vocab_size and not np.array_equal(head, embed[:TINY.vocab_size])
    hf.save_pretrained(tmp_path)
    config = LlamaConfig.from_hf(tmp_path)
    assert config.tie_word_embeddings is False and config == TINY.replace(name="")
    tokens = np.stack([_prompt(6, (), 4)])
    ours = VisionLlama(config).apply({"params": jax.tree.map(jnp.asarray, params_from_hf(hf, config))},
                                     jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf, tokens), atol=1e-4, rtol=1e-4)
