"""Patch selection and the serving paths that match it (`patches.resize`): blended tiles at
full resolution, fitting with padding, crops drawn for training, tiles for validation."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from segflow.config.experiment import ExperimentConfig, validate_config

from segflow.utils.errors import ConfigError
from segflow.data.patches import CropPlan, crop_plan, grid_tiles, labelled_pixels, model_mask, sample_crop
from segflow.data.preprocessing import blend_window, fitted_size, image_probabilities, model_pixels, tiled_probabilities

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("size", [(37, 53), (16, 16), (10, 7), (64, 48), (65, 49)])
def test_tiles_blend_back_to_the_image(size: tuple[int, int]) -> None:
    """An identity 'model' through the tiling gives the image back exactly: every pixel's
    weights sum to 1, mirroring and cropping put every tile back where it came from,
    also for images smaller than a tile and sizes that are not multiples of it."""
    image = tf.constant(RNG.random((2, *size, 3)).astype(np.float32))
    np.testing.assert_allclose(tiled_probabilities(lambda tiles: tiles, image, (16, 16)).numpy(), image.numpy(), atol=1e-5)


def test_tiles_see_their_own_position() -> None:
    """A 'model' that answers each tile's mean: a pixel's result is a mix of the tiles that
    cover it, so a left-to-right ramp stays increasing (tiles were not shuffled)."""
    ramp = tf.constant(np.tile(np.arange(96, dtype=np.float32), (1, 40, 1))[..., None])
    blended = tiled_probabilities(lambda tiles: tf.broadcast_to(tf.reduce_mean(tiles, axis=[1, 2], keepdims=True), tf.shape(tiles)), ramp, (16, 16))
    row = blended.numpy()[0, 20, :, 0]
    assert np.all(np.diff(row) >= -1e-4) and row[-1] - row[0] > 60


def test_blend_window_halves_sum_to_one() -> None:
    """Four tiles half a tile apart cover each pixel inside the image: their weights sum to 1."""
    window = blend_window((8, 12)).numpy()
    quarters = window[:4, :6] + window[4:, :6] + window[:4, 6:] + window[4:, 6:]
    np.testing.assert_allclose(quarters, 1.0, atol=1e-6)
    assert window.min() > 0 and window[0, 0] < 0.01


def test_resize_with_pad_keeps_the_aspect_ratio_and_comes_back() -> None:
    assert fitted_size(tf.constant([30, 60]), (32, 32, 3)).numpy().tolist() == [16, 32]
    assert fitted_size(tf.constant([64, 16]), (32, 32, 3)).numpy().tolist() == [32, 8]
    smooth = np.broadcast_to(np.linspace(0, 255, 60, dtype=np.float32)[None, :, None], (30, 60, 3))[None]
    pixels = model_pixels(tf.constant(smooth), (32, 32, 3), "resize_with_pad").numpy()
    assert pixels.shape == (1, 32, 32, 3) and np.all(pixels[:, 16:] == 0)  # padding below the fitted image
    back = image_probabilities(lambda tiles: tiles, tf.constant(smooth), (32, 32, 3), "resize_with_pad").numpy()
    assert back.shape == smooth.shape and np.abs(back - smooth).max() < 6.0  # a 2x down-up of a ramp, not the padding


def test_masks_are_fitted_with_ignore_index_and_never_blended() -> None:
    mask = tf.constant(RNG.integers(0, 3, (30, 60, 1)).astype(np.uint8))
    for ignore, fill in ((None, 0), (7, 7)):
        fitted = model_mask(mask, (32, 32, 3), "resize_with_pad", ignore).numpy()
        assert fitted.shape == (32, 32) and np.all(fitted[16:] == fill) and set(np.unique(fitted[:16])) <= {0, 1, 2}
    assert model_mask(mask, (32, 32, 3), "resize", None).shape == (32, 32)
    assert model_mask(mask, (32, 32, 3), "none", None).shape == (30, 60)


def test_crops_are_seeded_sized_and_centred_on_labels_when_asked() -> None:
    image = tf.constant(RNG.random((100, 120, 3)).astype(np.float32))
    mask = np.zeros((100, 120), np.uint8)
    mask[70:74, 100:104] = 2
    mask[0:3, 0:3] = 9  # ignore_index: never a crop's centre
    mask = tf.constant(mask)
    crops = [sample_crop(image, mask, tf.constant([seed, 0], tf.int64), (32, 32), CropPlan(1.0), 9) for seed in range(12)]
    assert all(crop[0].shape == (32, 32, 3) and crop[1].shape == (32, 32) for crop in crops)
    assert all(np.any(crop[1].numpy() == 2) for crop in crops)  # every crop holds the small object
    again = sample_crop(image, mask, tf.constant([3, 0], tf.int64), (32, 32), CropPlan(1.0), 9)
    np.testing.assert_array_equal(again[0].numpy(), crops[3][0].numpy())
    uniform = [sample_crop(image, mask, tf.constant([seed, 0], tf.int64), (32, 32), CropPlan(0.0), 9) for seed in range(12)]
    assert sum(np.any(crop[1].numpy() == 2) for crop in uniform) < 12  # uniform crops mostly miss it
    assert labelled_pixels(mask, 9).shape == (16, 2)


def test_a_stage_balances_negatives_against_positives() -> None:
    """`negatives`: none = every crop on an object, real = uniform, k = k background-centred
    crops per object-centred one (drawn, so about that ratio)."""
    assert crop_plan(0.3, None) == CropPlan(0.3) and crop_plan(0.3, "none") == CropPlan(1.0) and crop_plan(0.3, "real") == CropPlan(0.0)
    assert crop_plan(0.0, 3) == CropPlan(0.25, True)
    image = tf.constant(RNG.random((128, 128, 1)).astype(np.float32))
    mask = np.zeros((128, 128), np.uint8)
    mask[:40, :40] = 1  # the object fills the top-left corner; a background-centred crop far from it misses it
    mask = tf.constant(mask)
    draws = [sample_crop(image, mask, tf.constant([seed, 7], tf.int64), (32, 32), crop_plan(0.0, 3), None)[1].numpy() for seed in range(200)]
    with_object = sum(bool(np.any(crop == 1)) for crop in draws)
    assert 30 <= with_object <= 95  # 1 in 4 centred on the object, and background crops near it
    only_objects = [sample_crop(image, mask, tf.constant([seed, 7], tf.int64), (32, 32), crop_plan(0.0, "none"), None)[1].numpy() for seed in range(20)]
    assert all(np.any(crop == 1) for crop in only_objects)


def test_images_smaller_than_the_model_are_mirrored_not_stretched() -> None:
    image = tf.constant(RNG.random((20, 24, 1)).astype(np.float32))
    mask = tf.constant(RNG.integers(0, 2, (20, 24)).astype(np.uint8))
    crop_image, crop_mask = sample_crop(image, mask, tf.constant([1, 2], tf.int64), (32, 32), CropPlan(0.0), None)
    np.testing.assert_array_equal(crop_image.numpy()[:20, :24], image.numpy())
    np.testing.assert_array_equal(crop_image.numpy()[20:32, :24], image.numpy()[::-1][:12])
    np.testing.assert_array_equal(crop_mask.numpy()[:20, :24], mask.numpy())


def test_validation_tiles_cover_every_pixel_once_and_pad_with_ignore() -> None:
    image = tf.constant(RNG.random((40, 70, 3)).astype(np.float32))
    mask = tf.constant(RNG.integers(0, 3, (40, 70)).astype(np.uint8))
    tiles, masks = grid_tiles(image, mask, (32, 32), 255)
    assert tiles.shape == (2 * 3, 32, 32, 3) and masks.shape == (6, 32, 32)
    np.testing.assert_array_equal(tiles.numpy()[1], image.numpy()[:32, 32:64])
    np.testing.assert_array_equal(masks.numpy()[3][:8], mask.numpy()[32:40, :32])
    assert np.all(masks.numpy()[3][8:] == 255) and np.all(masks.numpy()[2][:, 6:] == 255)
    assert int((masks.numpy() != 255).sum()) == 40 * 70


def test_crop_options_need_crops(tiny_data: Path) -> None:
    """(Tiles half a tile apart need even sides: every architecture's stride already asks more.)"""
    from tests.conftest import tiny_raw_config

    for patches, stages in (({"positive_share": 0.5}, None), ({"resize": "resize_with_pad", "crops_per_image": 2}, None), ({}, [{"negatives": 2}])):
        with pytest.raises(ConfigError, match="need patches.resize none"):
            validate_config(tiny_raw_config(tiny_data, patches=patches, **({"stages": stages} if stages else {})))


def test_a_model_trained_on_crops_serves_whole_images_in_tiles(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Training on crops at full resolution, end to end through the cores: the trainer
    draws model-size crops and validates on tiles, `serving_default` blends tiles of any
    image size, and the exports' path (`predict_image` over `fixed_size`) gives the same
    masks; the evaluator scores the whole images."""
    from segflow.components.evaluator import core as evaluator
    from segflow.train.input_pipeline import make_dataset
    from segflow.components.transform.core import transform_layer
    from segflow.data.demo_data import write_demo_dataset
    from segflow.data.preprocessing import PixelSpec
    from segflow.export.serving import SERVING_SUBDIR, ServingSpec, predict_image, saved_model_predictor
    from tests.conftest import tiny_raw_config, train_cores

    data = write_demo_dataset(tmp_path / "data", count=12, size=64)
    raw = tiny_raw_config(
        data, patches={"resize": "none", "positive_share": 0.5, "crops_per_image": 2, "hard_negatives": {"share": 0.5, "refresh_every": 1, "keep": 64}},
        export=["saved_model"],
        stages=[{"epochs": 1, "learning_rate": 0.003, "negatives": "none"}, {"epochs": 1, "learning_rate": 0.001, "negatives": 1}],
    )
    config = validate_config(raw)
    trained = train_cores(config, tmp_path / "run")
    # Stage 2's first epoch needs the error maps of refresh 1: its crops waited for them.
    assert "trainer: hard negatives: error maps 1 of 9 train images" in capfd.readouterr().err
    layer, pixels = transform_layer(trained["transform"]), PixelSpec.load(trained["transform"])
    first, second = (
        next(iter(make_dataset(config, trained["examples"], "train", layer, pixels, epochs=(0, 1)))) for _ in range(2)
    )
    assert first[0].shape == (4, 32, 32, 3) and np.array_equal(first[1].numpy(), second[1].numpy())  # seeded crops
    validation = list(make_dataset(config, trained["examples"], "eval", layer, pixels))
    _hard_crops_do_not_depend_on_when_the_maps_come(config, trained["examples"], layer, pixels)
    assert sum(batch[1].shape[0] for batch in validation) == 4 * 3  # 3 eval images of 64x64 in 2x2 tiles of 32x32

    serving = Path(trained["model"]) / SERVING_SUBDIR
    spec = ServingSpec.load(serving)
    assert (spec.resize, spec.shape) == ("none", (32, 32, 3))
    loaded = tf.saved_model.load(str(serving))
    image = RNG.integers(0, 255, (1, 45, 77, 3)).astype(np.uint8)
    served = loaded.signatures["serving_default"](images=tf.constant(image))
    assert served["mask"].shape == (1, 45, 77)
    np.testing.assert_allclose(served["probabilities"].numpy().sum(axis=-1), 1.0, atol=1e-4)
    exported_path = predict_image(saved_model_predictor(serving), image[0], spec)
    assert (exported_path == served["mask"].numpy()[0]).mean() > 0.999
    report = evaluator.run(config, trained["examples"], trained["model"], tmp_path / "metrics", tmp_path / "blessing")
    assert 0.0 <= report["mean_iou"] <= 1.0


def _hard_crops_do_not_depend_on_when_the_maps_come(config: ExperimentConfig, examples: str, layer: Any, pixels: Any) -> None:
    """The crops of an epoch after a refresh are the same whether the maps were published
    before the stream was read or while it waited for them."""
    import threading

    from segflow.train.hard_negatives import train_error_maps as _error_maps
    from segflow.train.input_pipeline import make_dataset

    streams = []
    for delay in (0.0, 0.5):
        maps = _error_maps(config, examples)
        positions = np.tile(np.array([[40, 50]], np.int32), (len(maps.counts.numpy()), maps.keep, 1))
        counts = np.full(len(maps.counts.numpy()), maps.keep, np.int32)
        publish = threading.Timer(delay, maps.publish, (1, positions, counts))
        with maps.serving():
            publish.start()
            streams.append([batch[1].numpy() for batch in make_dataset(config, examples, "train", layer, pixels, epochs=(1, 2), error_maps=maps)])
    assert len(streams[0]) == len(streams[1]) and all(np.array_equal(a, b) for a, b in zip(*streams))


def test_error_maps_give_each_image_its_wrong_pixels() -> None:
    from segflow.data.error_maps import ErrorMaps, draw_positions, wrong_pixels

    mask = tf.constant([[0, 1, 9], [1, 1, 0]], tf.uint8)
    probabilities = tf.one_hot([[1, 1, 0], [1, 0, 0]], 2)  # wrong at (0,0) and (1,1); (0,2) is ignore_index
    wrong = wrong_pixels(probabilities, mask, 9)
    assert sorted(map(tuple, wrong.numpy().tolist())) == [(0, 0), (1, 1)]
    drawn = draw_positions(wrong, 4, (1, 2))
    assert drawn.shape == (4, 2) and sorted(map(tuple, drawn[:2].tolist())) == [(0, 0), (1, 1)]
    maps = ErrorMaps(["a.png", "b.png"], every=2, keep=4, seed=0)
    assert maps.candidates(tf.constant("a.png"), 1).shape == (0, 2)  # epoch 1: before the first refresh
    maps.publish(1, np.stack([drawn, np.zeros_like(drawn)]), np.array([2, 0], np.int32))
    assert maps.candidates(tf.constant("a.png"), 3).numpy().tolist() == drawn[:2].tolist()
    assert maps.candidates(tf.constant("b.png"), 3).shape == (0, 2) and maps.candidates(tf.constant("new.png"), 3).shape == (0, 2)
