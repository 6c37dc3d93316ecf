"""Llama 3.2 Vision's image encoder + projector (model/vision.py) against transformers' MllamaVisionModel and
multi_modal_projector on a random tiny Mllama (gates, norms and tile/positional embeddings randomized), fp32."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import LlamaConfig
from llama_jax.model import spec
from llama_jax.model.vision import Projector, VisionEncoder, cross_attention_states
from mllama_util import make_hf_mllama, params_from_hf, random_images


@pytest.fixture(scope="module")
def setup():
    config = LlamaConfig.from_preset("tiny-vision")
    # A layer-norm eps apart from torch's default: the encoder layers take it, ln_pre/ln_post do not.
    config = config.replace(vision=dataclasses.replace(config.vision, norm_eps=1e-3))
    model = make_hf_mllama(config, seed=0)
    params = jax.tree_util.tree_map(jnp.asarray, params_from_hf(model, config))

    @jax.jit  # the encoder's output, and the public function's states (the encoder again: one compile)
    def run(params, pixel_values, ids, mask):
        features = VisionEncoder(config).apply({"params": params["vision"]}, pixel_values, ids, mask)
        return features, cross_attention_states(params, config, pixel_values, ids, mask)

    return config, model, params, run


def _reference(model, config, pixel_values, ids, mask):
    """transformers: the vision model's output [B, I, T, P, O] and MllamaModel's cross_attention_states."""
    import torch

    with torch.no_grad():
        features = model.model.vision_model(pixel_values=torch.tensor(pixel_values),
                                            aspect_ratio_ids=torch.tensor(ids),
                                            aspect_ratio_mask=torch.tensor(mask)).last_hidden_state
        states = model.model.multi_modal_projector(features).reshape(-1, features.shape[-2], config.hidden_size)
    return features.numpy(), states.numpy()


# Tiles per image, per batch row: one tile; four tiles (aspect-ratio id > 1); two images of different tile
# counts (padded tiles masked); a batch of two rows, the second with a missing (padding) image.
CASES = {"1 image 1 tile": [[1]], "1 image 4 tiles": [[4]], "2 images 2+3 tiles": [[2, 3]],
         "batch 2": [[1, 3], [4]]}


@pytest.mark.parametrize("tiles", CASES.values(), ids=CASES.keys())
def test_matches_transformers(setup, tiles):
    config, model, params, run = setup
    pixel_values, ids, mask = random_images(config, tiles, seed=len(tiles) * 10 + tiles[0][0])
    ref_features, ref_states = _reference(model, config, pixel_values, ids, mask)
    features, states = run(params, pixel_values, ids, mask)
    np.testing.assert_allclose(np.asarray(features), ref_features, atol=1e-4, rtol=1e-4)
    b, i, t, p, _ = ref_features.shape
    assert states.shape == (b, i * t * p, config.hidden_size)
    np.testing.assert_allclose(np.asarray(states), ref_states.reshape(states.shape), atol=1e-4, rtol=1e-4)


def test_projector_alone(setup):
    """Projector on the encoder's features gives the same states (what VisionLlama calls inside Flax)."""
    config, _, params, run = setup
    pixel_values, ids, mask = random_images(config, [[4]], seed=3)
    features, states = run(params, pixel_values, ids, mask)
    alone = Projector(config).apply({"params": params["projector"]}, features)
    np.testing.assert_allclose(np.asarray(alone), np.asarray(states), atol=1e-5, rtol=1e-5)


def test_bfloat16_smoke(setup):
    config, _, params, run = setup
    pixel_values, ids, mask = random_images(config, [[2]], seed=4)
    bf16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    low = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    states = jax.jit(lambda p, *a: cross_attention_states(p, bf16, *a))(low, pixel_values, ids, mask)
    assert states.dtype == jnp.bfloat16
    full = np.asarray(run(params, pixel_values, ids, mask)[1])
    states = np.asarray(states.astype(jnp.float32))
    assert np.isfinite(states).all()
    assert np.abs(states - full).max() < 0.1 * np.abs(full).max()


def test_flax_params_are_the_spec_rows(setup):
    """Flax's own tree (shapes, logical axes) for the encoder and projector is the spec's vision/projector rows."""
    config, _, _, _ = setup
    pixel_values, ids, mask = random_images(config, [[1]])

    def init(pixel_values, ids, mask):
        from llama_jax.model.vision import _ImageStates
        return _ImageStates(config).init(jax.random.PRNGKey(0), pixel_values, ids, mask)["params"]

    boxed = jax.eval_shape(init, pixel_values, ids, mask)
    ours = {k: boxed[k] for k in ("vision", "projector")}
    shapes = spec.param_shapes(config)
    axes = spec.logical_axes(config)
    want = jax.tree_util.tree_map(lambda s: s.shape, {k: shapes[k] for k in ours})
    got = jax.tree_util.tree_map(lambda b: b.value.shape, ours, is_leaf=lambda x: hasattr(x, "names"))
    assert got == want
    got_axes = jax.tree_util.tree_map(lambda b: tuple(b.names), ours, is_leaf=lambda x: hasattr(x, "names"))
    assert got_axes == jax.tree_util.tree_map(tuple, {k: axes[k] for k in ours},
                                              is_leaf=lambda x: not isinstance(x, dict))
