"""Every registered architecture, backbone, loss and augmentation, exercised by looping
over its registry: a new entry is tested the moment it is registered."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from segflow.data.augment import apply_policy, build_policy
from segflow.model.losses import LabelSpec, build_loss
from segflow.model.models import ModelSpec, build_model
from segflow.utils.registry import ARCHITECTURES, AUGMENTATIONS, LOSSES, Registry


def test_duplicate_names_are_errors() -> None:
    registry: Registry = Registry("thing", "segflow.utils.registry")
    registry.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        registry.add("a", 2)
    with pytest.raises(KeyError, match="unknown thing 'b'"):
        registry.get("b")


@pytest.mark.parametrize("architecture", ARCHITECTURES.names())
@pytest.mark.parametrize(("channels", "outputs"), [(1, 1), (3, 5)])
def test_architectures_produce_logits_at_input_size(architecture: str, channels: int, outputs: int) -> None:
    """Non-square input on the simple encoder; every backbone is looped in tests/model/test_architectures.py."""
    model = build_model(architecture, ModelSpec(shape=(32, 48, channels), output_channels=outputs, depth=2, base_filters=4, backbone="simple"))
    logits = model(np.random.default_rng(0).random((2, 32, 48, channels), np.float32))
    assert logits.shape == (2, 32, 48, outputs)
    assert np.isfinite(logits.numpy()).all()


def test_unet_rejects_sizes_not_divisible_by_its_depth() -> None:
    with pytest.raises(ValueError, match="divisible by 8"):
        build_model("unet", ModelSpec(shape=(36, 36, 3), output_channels=2, depth=3))


def _labels_and_logits(num_labels: int, sigmoid: bool) -> tuple[tf.Tensor, tf.Tensor]:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, num_labels, size=(2, 8, 8)).astype(np.int32)
    logits = rng.normal(size=(2, 8, 8, 1 if sigmoid else num_labels)).astype(np.float32)
    return tf.constant(labels), tf.constant(logits)


@pytest.mark.parametrize("name", LOSSES.names())
@pytest.mark.parametrize("sigmoid", [False, True])
def test_losses_are_finite_differentiable_and_reward_the_truth(name: str, sigmoid: bool) -> None:
    num_labels = 2 if sigmoid else 4
    spec = LabelSpec(num_labels, sigmoid)
    labels, logits = _labels_and_logits(num_labels, sigmoid)
    loss = build_loss(name, spec)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        value = loss(labels, logits)
    assert np.isfinite(value.numpy())
    assert np.abs(tape.gradient(value, logits).numpy()).sum() > 0
    if sigmoid:
        perfect = tf.where(labels[..., None] == 1, 20.0, -20.0)
    else:
        perfect = tf.one_hot(labels, num_labels) * 40.0 - 20.0
    assert loss(labels, perfect).numpy() < value.numpy()
    assert loss(labels, perfect).numpy() < 0.05


@pytest.mark.parametrize("name", LOSSES.names())
def test_losses_ignore_ignore_index(name: str) -> None:
    spec = LabelSpec(3, False, ignore_index=255)
    labels, logits = _labels_and_logits(3, False)
    labels = tf.tensor_scatter_nd_update(labels, [[0, 0, 0], [1, 3, 3]], [255, 255])
    loss = build_loss(name, spec)
    changed = tf.tensor_scatter_nd_update(logits, [[0, 0, 0], [1, 3, 3]], [[50.0, -50.0, 0.0], [-9.0, 9.0, 30.0]])
    np.testing.assert_allclose(loss(labels, logits).numpy(), loss(labels, changed).numpy(), rtol=1e-5)


def test_weighted_loss_sum() -> None:
    spec = LabelSpec(3)
    labels, logits = _labels_and_logits(3, False)
    combined = build_loss("crossentropy+0.5*dice", spec)(labels, logits).numpy()
    expected = build_loss("crossentropy", spec)(labels, logits).numpy() + 0.5 * build_loss("dice", spec)(labels, logits).numpy()
    np.testing.assert_allclose(combined, expected, rtol=1e-5)


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
@pytest.mark.parametrize("channels", [1, 3])
def test_augmentations_keep_shapes_and_labels(name: str, channels: int, tmp_path: Path) -> None:
    from tests.data.test_augmentation import entry_params  # required parameters (crop sizes, a background folder)

    rng = np.random.default_rng(2)
    image = rng.random((32, 32, channels), np.float32)
    mask = rng.integers(0, 3, size=(32, 32)).astype(np.uint8)
    mask[:4, :4] = 255  # an ignored region must stay an allowed label value
    policy = build_policy({name: entry_params(name, tmp_path)}, seed=0)
    out_image, out_mask = apply_policy(policy, image, mask)
    assert out_image.shape == image.shape and out_image.dtype == np.float32
    assert out_mask.shape == mask.shape and out_mask.dtype == np.uint8
    assert set(np.unique(out_mask)) <= {0, 1, 2, 255}


def test_invalid_augmentation_parameters_name_the_transform() -> None:
    with pytest.raises(ValueError, match="augmentation.HorizontalFlip"):
        build_policy({"HorizontalFlip": {"probability": 2}})
