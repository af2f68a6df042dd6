import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifarjax.augment import (IMAGENET_MEAN, AugmentSpec, HostAugment, augment, crop, draw_choices, eval_view, flip,
                              with_normalization)
from cifarjax.config import Config


@pytest.fixture
def images(rng):
    return rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)


def test_prepare_scales_to_unit_range_without_randomness(images):
    x = np.asarray(eval_view(jnp.asarray(images), AugmentSpec()))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, images / 255.0, rtol=1e-6)  # one float32 division: within 1 ulp (6e-8)


def test_flip_equals_numpy_flip(images):
    flips = np.arange(64) % 3 == 0
    out = np.asarray(flip(jnp.asarray(images), jnp.asarray(flips)))
    np.testing.assert_array_equal(out[flips], images[flips][:, :, ::-1])
    np.testing.assert_array_equal(out[~flips], images[~flips])


def test_flip_rate_is_one_half():
    flips = draw_choices(jax.random.PRNGKey(0), 20000, AugmentSpec()).flips
    assert abs(float(flips.mean()) - 0.5) < 0.015  # 4 standard deviations of a 20,000-draw mean (0.0035)
    assert not bool(draw_choices(jax.random.PRNGKey(0), 100, AugmentSpec(flip=False)).flips.any())


def test_augment_flips_exactly_the_drawn_images(images):
    spec = AugmentSpec()
    choices = draw_choices(jax.random.PRNGKey(3), 64, spec)
    out = np.asarray(augment(jnp.asarray(images), choices, spec))
    expected = np.where(np.asarray(choices.flips)[:, None, None, None], images[:, :, ::-1], images) / 255.0
    np.testing.assert_allclose(out, expected, rtol=1e-6)  # a flip moves values; one division rounds


def test_random_crop_shifts_within_padding(images):
    offsets = jnp.asarray([[0, 0], [4, 4], [8, 8]])
    out = np.asarray(crop(jnp.asarray(images[:3]), offsets, 4))
    assert out.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(out[1], images[1])
    np.testing.assert_array_equal(out[0, 4:, 4:], images[0, :28, :28])
    assert (out[0, :4] == 0).all() and (out[2, -4:] == 0).all()


def test_resize_and_imagenet_normalisation(images):
    spec = AugmentSpec(img_size=64, mean=IMAGENET_MEAN, std=(0.229, 0.224, 0.225))
    x = np.asarray(eval_view(jnp.asarray(images[:2]), spec))
    assert x.shape == (2, 64, 64, 3)
    flat = np.asarray(eval_view(jnp.full((1, 32, 32, 3), 255, jnp.uint8), spec))
    np.testing.assert_allclose(flat[0, 0, 0], (1 - np.array(IMAGENET_MEAN)) / np.array(spec.std),
                               rtol=1e-5)  # a few float32 operations (and a resize's weights summing to 1)


def test_dataset_normalisation_stats(images):
    config = with_normalization(Config(normalize="dataset"), images)
    mean, std = config.norm_mean, config.norm_std
    np.testing.assert_allclose(mean, images.reshape(-1, 3).mean(0) / 255, rtol=1e-6)  # float64 sums, two orders
    np.testing.assert_allclose(std, images.reshape(-1, 3).std(0) / 255, rtol=1e-6)
    assert with_normalization(Config(), images).norm_mean is None  # --normalize none


def test_albumentations_pipeline_default_is_the_originals(images):
    """The host flips uint8 images at their decoded size; the device scales and resizes them (the original's
    Resize and ToFloat(255)): 1 byte per decoded pixel crosses to the device, not 4 per resized one."""
    aug = HostAugment(seed=0)
    out = aug(images[:2][None], 0)
    assert out.shape == (1, 2, 32, 32, 3) and out.dtype == np.uint8
    for o, im in zip(out[0], images[:2]):
        assert np.array_equal(o, im) or np.array_equal(o, im[:, ::-1])
    again = HostAugment(seed=0)(images[:2][None], 0)
    np.testing.assert_array_equal(out, again)
    view = eval_view(out[0], AugmentSpec(img_size=224))
    assert view.shape == (2, 224, 224, 3) and view.dtype == jnp.float32
    np.testing.assert_array_equal(eval_view(out[0], AugmentSpec()), out[0] / np.float32(255))


def test_host_augment_gives_each_step_its_own_draws_from_several_threads():
    """The prefetching thread and the loop may augment at once; the transform's random state is shared, so without
    the lock their draws mixed (59 of 200 batches differed on 85a8534)."""
    import threading
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    augment = HostAugment(seed=0)
    want = {step: augment(images, step) for step in range(40)}
    got = {}

    def draw(steps):
        for step in steps:
            got[step] = augment(images, step)
    for _ in range(2):
        threads = [threading.Thread(target=draw, args=(range(k, 40, 2),)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(np.array_equal(got[step], want[step]) for step in range(40))
