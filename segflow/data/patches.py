"""Patch selection: how training and validation examples of the model's size are cut from
images at full resolution (`patches.resize: none`).

Training draws `crops_per_image` crops from every image each epoch: a share
(`positive_share`) centred on a random labelled pixel (a class other than 0 and
ignore_index), so that rare objects are seen, the rest uniform over the image. The draws
are stateless functions of (seed, epoch, file name), like the augmentation's, so a run is
reproducible whatever the thread scheduling. Validation during training covers each image
with a grid of model-size tiles, so checkpoints are chosen on every pixel and not on a
centre crop; the evaluator scores whole images through `serving_default`, which blends
overlapping tiles (`preprocessing.tiled_probabilities`). Images smaller than the model are
mirrored at their bottom and right edges, as in serving; pixels outside the image are
ignore_index in the validation masks (when the dataset has one), never a real class.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import tensorflow as tf

from segflow.data.augment import mask_fill
from segflow.data.preprocessing import fitted_size, mirror_pad


def model_mask(mask: tf.Tensor, shape: tuple[int, int, int] | list[int], resize: str, ignore_index: int | None) -> tf.Tensor:
    """A decoded mask [H,W,1] uint8 -> [h,w] as the model is trained on it (`patches.resize`):
    nearest-neighbour resized, fitted with padding of `mask_fill`, or at full resolution."""
    height, width = shape[0], shape[1]
    if resize == "none":
        return mask[..., 0]
    if resize == "resize":
        return tf.image.resize(mask, [height, width], method="nearest")[..., 0]
    fitted = fitted_size(tf.shape(mask)[:2], shape)
    inside = tf.cast(tf.image.resize(mask, fitted, method="nearest"), tf.int32)
    padded = tf.pad(inside, [[0, height - fitted[0]], [0, width - fitted[1]], [0, 0]], constant_values=mask_fill(ignore_index))
    return tf.ensure_shape(tf.cast(padded, tf.uint8)[..., 0], [height, width])


def _at_least(image: tf.Tensor, mask: tf.Tensor, tile: tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor]:
    """Image [H,W,C] and mask [H,W] mirrored up to at least the tile's size."""
    height = tf.maximum(tf.shape(mask)[0], tile[0])
    width = tf.maximum(tf.shape(mask)[1], tile[1])
    return mirror_pad(image[None], height, width)[0], mirror_pad(mask[None, ..., None], height, width)[0, ..., 0]


def labelled_pixels(mask: tf.Tensor, ignore_index: int | None) -> tf.Tensor:
    """[N, 2] int32 positions of the pixels of a class other than 0 (and not ignore_index)."""
    labelled = tf.not_equal(mask, 0)
    if ignore_index is not None:
        labelled &= tf.not_equal(mask, ignore_index)
    return tf.cast(tf.where(labelled), tf.int32)


def unlabelled_pixels(mask: tf.Tensor, ignore_index: int | None) -> tf.Tensor:
    """[N, 2] int32 positions of the background pixels (class 0; none when 0 is ignore_index)."""
    background = tf.equal(mask, 0) & tf.constant(ignore_index != 0)
    return tf.cast(tf.where(background), tf.int32)


class CropPlan(NamedTuple):
    """How a crop's centre is chosen: on a pixel the model last got wrong with probability
    `hard_share` (segflow.data.error_maps), else on a labelled pixel with probability
    `positive_share`, else on a background pixel (`negatives_centred`) or anywhere."""

    positive_share: float
    negatives_centred: bool = False
    hard_share: float = 0.0


def crop_plan(positive_share: float, negatives: str | int | None, hard_share: float = 0.0) -> CropPlan:
    """A stage's `negatives` over `patches.positive_share`: `none` positives only (objects
    first), `real` uniform crops (the data's own ratio), k: k background-centred crops per
    labelled-centred one; null: `positive_share`, the rest uniform."""
    if negatives is None:
        return CropPlan(positive_share, hard_share=hard_share)
    if negatives == "none":
        return CropPlan(1.0, hard_share=hard_share)
    if negatives == "real":
        return CropPlan(0.0, hard_share=hard_share)
    return CropPlan(1.0 / (1 + int(negatives)), True, hard_share)


def sample_crop(
    image: tf.Tensor,
    mask: tf.Tensor,
    seed: tf.Tensor,
    tile: tuple[int, int],
    plan: CropPlan,
    ignore_index: int | None,
    errors: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """One model-size crop [h,w,C], [h,w] of a full-resolution example, drawn from `seed`
    (a stateless [2] seed) by `plan`; `errors` [K,2] are the pixels the model last got
    wrong (hard negatives). A centre with no candidate pixel falls back to uniform."""
    image, mask = _at_least(image, mask, tile)
    height, width = tf.shape(mask)[0], tf.shape(mask)[1]
    choice_seed, place_seed, hard_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))

    def uniform() -> tuple[tf.Tensor, tf.Tensor]:
        corner = tf.random.stateless_uniform([2], place_seed, maxval=tf.int32.max, dtype=tf.int32)
        return corner[0] % (height - tile[0] + 1), corner[1] % (width - tile[1] + 1)

    def centred_on(candidates: tf.Tensor) -> Callable[[], tuple[tf.Tensor, tf.Tensor]]:
        def centred() -> tuple[tf.Tensor, tf.Tensor]:
            pick = tf.random.stateless_uniform([], place_seed, maxval=tf.int32.max, dtype=tf.int32) % tf.maximum(tf.shape(candidates)[0], 1)
            centre = candidates[pick]
            return (
                tf.clip_by_value(centre[0] - tile[0] // 2, 0, height - tile[0]),
                tf.clip_by_value(centre[1] - tile[1] // 2, 0, width - tile[1]),
            )

        return lambda: tf.cond(tf.shape(candidates)[0] > 0, centred, uniform)

    otherwise = centred_on(unlabelled_pixels(mask, ignore_index)) if plan.negatives_centred else uniform

    def regular() -> tuple[tf.Tensor, tf.Tensor]:
        if plan.positive_share == 0:
            return otherwise()
        positive = tf.random.stateless_uniform([], choice_seed) < plan.positive_share
        return tf.cond(positive, centred_on(labelled_pixels(mask, ignore_index)), otherwise)

    if errors is not None and plan.hard_share > 0:
        hard = tf.random.stateless_uniform([], hard_seed) < plan.hard_share
        top, left = tf.cond(hard, centred_on(errors), regular)
    else:
        top, left = regular()
    crop_image = image[top : top + tile[0], left : left + tile[1]]
    crop_mask = mask[top : top + tile[0], left : left + tile[1]]
    return tf.ensure_shape(crop_image, [*tile, image.shape[-1]]), tf.ensure_shape(crop_mask, list(tile))


def grid_tiles(image: tf.Tensor, mask: tf.Tensor, tile: tuple[int, int], ignore_index: int | None) -> tuple[tf.Tensor, tf.Tensor]:
    """Every pixel of a full-resolution example in non-overlapping tiles: [N,h,w,C], [N,h,w].
    The grid is mirrored past the image's bottom and right edges; those mask pixels are
    ignore_index when the dataset has one (else the mirrored labels of the mirrored image)."""
    height, width = tf.shape(mask)[0], tf.shape(mask)[1]
    rows, cols = -(-height // tile[0]), -(-width // tile[1])
    image = mirror_pad(image[None], rows * tile[0], cols * tile[1])[0]
    mask = mirror_pad(mask[None, ..., None], rows * tile[0], cols * tile[1])[0, ..., 0]
    if ignore_index is not None:
        inside = (tf.range(rows * tile[0])[:, None] < height) & (tf.range(cols * tile[1])[None, :] < width)
        mask = tf.where(inside, mask, tf.constant(ignore_index, mask.dtype))
    channels = image.shape[-1]
    image_tiles = tf.reshape(tf.transpose(tf.reshape(image, [rows, tile[0], cols, tile[1], channels]), [0, 2, 1, 3, 4]), [-1, *tile, channels])
    mask_tiles = tf.reshape(tf.transpose(tf.reshape(mask, [rows, tile[0], cols, tile[1]]), [0, 2, 1, 3]), [-1, *tile])
    return image_tiles, mask_tiles
