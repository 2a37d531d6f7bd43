"""Every registered loss, looped over the LOSSES registry (finite, differentiable, rewards the
truth, skips ignore_index, honours class weights), Lovász against a brute-force reference,
U-Net border weights, loss expressions with parameters, class weights from the data, and the
trainer's per-epoch metrics against the evaluator's numpy confusion matrix."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import tensorflow as tf

from segflow.config.experiment import ExperimentConfig

from segflow.utils.errors import ConfigError

from segflow.model.losses import parse_loss
from segflow.data.examples import SegmentationExample, serialize, shard_name, split_dir, write_shard
from segflow.model.losses import PARAMETER_RANGES, LabelSpec, border_weights, build_loss, loss_parameters, median_frequency_weights, resolve_class_weights
from segflow.model.metrics import ConfusionMatrix, SegmentationMetrics, metric_key
from segflow.utils.registry import LOSSES

# One name per loss function: aliases (ce, iou, ...) share their function's tests.
LOSS_NAMES = sorted({LOSSES.get(name): name for name in reversed(LOSSES.names())}.values())
IGNORE = 255


def _case(num_labels: int, sigmoid: bool, seed: int = 0, size: int = 12) -> tuple[tf.Tensor, tf.Tensor]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, size=(2, size, size)).astype(np.int32)
    labels[0, :4, :4] = 1  # an object of 16 pixels, so border weights have something to measure
    logits = rng.normal(size=(2, size, size, 1 if sigmoid else num_labels)).astype(np.float32)
    return tf.constant(labels), tf.constant(logits)


def _perfect(labels: tf.Tensor, num_labels: int, sigmoid: bool, shift: int = 0) -> tf.Tensor:
    """Saturated logits for `labels` (shift > 0: for the wrong class)."""
    target = (labels + shift) % num_labels
    if sigmoid:
        return tf.where(target[..., None] == 1, 20.0, -20.0)
    return tf.one_hot(target, num_labels) * 40.0 - 20.0


def _value_and_gradient(name: str, spec: LabelSpec, labels: tf.Tensor, logits: tf.Tensor) -> tuple[float, np.ndarray]:
    loss = build_loss(name, spec)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        value = loss(labels, logits)
    return float(value.numpy()), tape.gradient(value, logits).numpy()


HEADS = [(2, True), (2, False), (3, False)]


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize(("num_labels", "sigmoid"), HEADS)
def test_loss_is_finite_differentiable_and_minimal_at_the_truth(name: str, num_labels: int, sigmoid: bool) -> None:
    spec = LabelSpec(num_labels, sigmoid)
    labels, logits = _case(num_labels, sigmoid)
    value, gradient = _value_and_gradient(name, spec, labels, logits)
    assert np.isfinite(value) and np.isfinite(gradient).all() and np.abs(gradient).sum() > 0
    perfect = build_loss(name, spec)(labels, _perfect(labels, num_labels, sigmoid)).numpy()
    wrong = build_loss(name, spec)(labels, _perfect(labels, num_labels, sigmoid, shift=1)).numpy()
    assert perfect < 0.01 and perfect < value < wrong


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize(("num_labels", "sigmoid"), HEADS)
def test_ignored_pixels_change_neither_loss_nor_gradient(name: str, num_labels: int, sigmoid: bool) -> None:
    spec = LabelSpec(num_labels, sigmoid, ignore_index=IGNORE)
    labels, logits = _case(num_labels, sigmoid, seed=1)
    ignored = np.zeros(labels.shape, bool)
    ignored[0, 5:9, 2:7] = ignored[1, 0, :] = True
    labels = tf.where(ignored, IGNORE, labels)
    changed = tf.where(ignored[..., None], tf.random.stateless_normal(logits.shape, [3, 4]) * 30.0, logits)
    value, gradient = _value_and_gradient(name, spec, labels, logits)
    value_changed, gradient_changed = _value_and_gradient(name, spec, labels, changed)
    np.testing.assert_allclose(value, value_changed, rtol=1e-5)
    np.testing.assert_allclose(gradient, gradient_changed, rtol=1e-4, atol=1e-7)
    assert not gradient[ignored].any()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_class_weights_are_honoured(name: str) -> None:
    labels, logits = _case(3, False, seed=2)
    logits = tf.where((labels == 1)[..., None], logits, _perfect(labels, 3, False) / 10.0)  # class 1 is the hard one
    plain = build_loss(name, LabelSpec(3))(labels, logits).numpy()
    ones = build_loss(name, LabelSpec(3, class_weights=(1.0, 1.0, 1.0)))(labels, logits).numpy()
    weighted = build_loss(name, LabelSpec(3, class_weights=(0.2, 5.0, 1.0)))(labels, logits).numpy()
    np.testing.assert_allclose(plain, ones, rtol=1e-6)
    assert weighted > 1.05 * plain  # the hard class counts more


def test_hand_computed_values() -> None:
    """Cross-entropy weighted by class, Dice and focal with alpha on a 1x1x2 image of two pixels."""
    labels = tf.constant([[[0, 1]]])
    logits = tf.constant([[[[2.0, 0.0], [0.0, 1.0]]]])
    p0 = np.exp(2.0) / (np.exp(2.0) + 1.0)  # pixel 0: true class 0
    p1 = np.exp(1.0) / (np.exp(1.0) + 1.0)  # pixel 1: true class 1
    ce = build_loss("crossentropy", LabelSpec(2, class_weights=(1.0, 3.0)))(labels, logits).numpy()
    np.testing.assert_allclose(ce, (-np.log(p0) - 3.0 * np.log(p1)) / 4.0, rtol=1e-5)
    dice_scores = [2 * p0 / (p0 + 1 - p1 + 1), 2 * p1 / (1 - p0 + p1 + 1)]
    np.testing.assert_allclose(build_loss("dice", LabelSpec(2))(labels, logits).numpy(), 1 - np.mean(dice_scores), rtol=1e-5)
    focal = build_loss("focal(gamma=2, alpha=0.25)", LabelSpec(2))(labels, logits).numpy()
    expected = (0.75 * (1 - p0) ** 2 * -np.log(p0) + 0.25 * (1 - p1) ** 2 * -np.log(p1)) / 2
    np.testing.assert_allclose(focal, expected, rtol=1e-5)


def _jaccard_loss_of_set(mispredicted: np.ndarray, truth: np.ndarray) -> float:
    """Jaccard loss when exactly the pixels in `mispredicted` are wrong: 1 - |G \\ M| / |G u M|."""
    union = np.sum(truth | mispredicted)
    return 1.0 - np.sum(truth & ~mispredicted) / union if union else 0.0


def _lovasz_reference(errors: np.ndarray, truth: np.ndarray) -> float:
    """The Lovász extension as an integral over thresholds (no sorting of pixels, ties allowed):
    sum over the distinct error levels v_1 > ... > v_k > 0 of (v_j - v_j+1) x loss({m >= v_j})."""
    levels = np.unique(errors[errors > 0])[::-1]
    steps = levels - np.append(levels[1:], 0.0)
    return float(sum(step * _jaccard_loss_of_set(errors >= level, truth) for level, step in zip(levels, steps)))


@pytest.mark.parametrize("seed", range(4))
def test_lovasz_matches_a_brute_force_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=(1, 3, 4))
    labels.flat[0] = IGNORE
    logits = rng.normal(size=(1, 3, 4, 3)).astype(np.float32)
    logits[0, 1, :2] = logits[0, 1, 2:]  # ties in the errors
    keep = labels.reshape(-1) != IGNORE
    flat_labels, flat_logits = labels.reshape(-1)[keep], logits.reshape(-1, 3)[keep]
    probs = np.exp(flat_logits) / np.exp(flat_logits).sum(-1, keepdims=True)
    per_class = [_lovasz_reference(np.abs((flat_labels == c) - probs[:, c]), flat_labels == c) for c in range(3) if (flat_labels == c).any()]
    spec = LabelSpec(3, ignore_index=IGNORE)
    np.testing.assert_allclose(build_loss("lovasz_softmax", spec)(tf.constant(labels), tf.constant(logits)).numpy(), np.mean(per_class), rtol=1e-5)

    binary = (labels % 2).astype(np.int32)
    binary.flat[0] = IGNORE
    truth = binary.reshape(-1)[keep] == 1
    scores = logits[..., :1]
    hinge = np.maximum(1.0 - scores.reshape(-1)[keep] * np.where(truth, 1.0, -1.0), 0.0)
    value = build_loss("lovasz_hinge", LabelSpec(2, sigmoid=True, ignore_index=IGNORE))(tf.constant(binary), tf.constant(scores)).numpy()
    np.testing.assert_allclose(value, _lovasz_reference(hinge, truth), rtol=1e-5)


def test_border_weights_peak_between_two_objects_and_match_full_distance_transforms() -> None:
    from scipy import ndimage

    labels = np.zeros((1, 40, 40), np.int32)
    labels[0, 5:15, 5:15] = 1
    labels[0, 5:15, 17:27] = 2  # a 2-pixel gap from the first object
    labels[0, 30:36, 30:36] = 1
    weights = border_weights(labels, 3, w0=10.0, sigma=5.0)
    gap, far = weights[0, 10, 15], weights[0, 38, 2]
    assert gap > 5.0 and far < 0.1 and gap > weights[0, 25, 10]
    # Reference: every object's distance transform over the whole image, no bounding boxes.
    components = [ndimage.label(labels[0] == label)[0] == index for label in (1, 2) for index in (1, 2)]
    distances = np.sort(np.stack([ndimage.distance_transform_edt(~mask) for mask in components if mask.any()]), axis=0)
    expected = 10.0 * np.exp(-np.square(distances[0] + distances[1]) / 50.0)
    np.testing.assert_allclose(weights[0], expected, atol=10.0 * 1e-3)
    assert not border_weights(labels[:, :20, :16], 3).any()  # one object: no border term


def test_expressions_compose_with_weights_and_parameters() -> None:
    spec = LabelSpec(2, sigmoid=True)
    labels, logits = _case(2, True, seed=3)
    combined = build_loss("bce+0.1*dice", spec)(labels, logits).numpy()
    expected = build_loss("bce", spec)(labels, logits).numpy() + 0.1 * build_loss("dice", spec)(labels, logits).numpy()
    np.testing.assert_allclose(combined, expected, rtol=1e-6)
    gamma_one = build_loss("0.5 * focal(gamma=1, alpha=0.5) + lovasz", spec)(labels, logits).numpy()
    parts = 0.5 * build_loss("focal(alpha=0.5,gamma=1)", spec)(labels, logits).numpy() + build_loss("lovasz", spec)(labels, logits).numpy()
    np.testing.assert_allclose(gamma_one, parts, rtol=1e-6)
    assert gamma_one != pytest.approx(build_loss("0.5*focal+lovasz", spec)(labels, logits).numpy())
    assert [tuple(term) for term in parse_loss("bce+0.1*dice")] == [(1.0, "bce", {}), (0.1, "dice", {})]
    assert loss_parameters("distance_focal") == {"gamma": 2.0, "alpha": None, "w0": 10.0, "sigma": 5.0}
    assert all(set(loss_parameters(name)) <= set(PARAMETER_RANGES) for name in LOSS_NAMES)  # every parameter is range-checked


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("crossentropy+lovaz", r"unknown loss 'lovaz'; registered: .*lovasz, lovasz_hinge"),
        ("focal(beta=1)", "loss 'focal' has no parameter 'beta'; it takes alpha, gamma"),
        ("dice(gamma=2)", "takes no parameters"),
        ("focal(gamma=11)", "gamma=11 is outside 0..10"),
        ("focal(gamma=1, gamma=2)", "given twice"),
        ("focal(gamma=-1)", "cannot parse parameter"),
        ("focal(gamma=1", "cannot parse loss term"),
    ],
)
def test_bad_expressions_fail_clearly(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_loss(expression)


def test_class_weights_auto_is_median_frequency_of_the_train_masks(tmp_path: Path) -> None:
    # Eigen & Fergus: freq(c) = class pixels / pixels of the images containing c.
    assert median_frequency_weights([300, 100, 0], [400, 200, 0]) == pytest.approx((0.625 / 0.75, 0.625 / 0.5, 1.0))
    masks = [np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8)]
    masks[0][0, :2] = 1
    masks[1][3, :] = IGNORE  # ignored pixels count for no class
    folder = split_dir(tmp_path, "train")
    folder.mkdir(parents=True)
    image = np.zeros((4, 4, 1), np.uint8)
    write_shard(folder / shard_name(0, 1), [serialize(SegmentationExample(f"m{i}", image, mask)) for i, mask in enumerate(masks)])
    weights = resolve_class_weights("auto", tmp_path, ["background", "object"])
    frequency = np.array([14 / 16, 14 / 28])  # class 1: 2 + 12 pixels in images of 16 + 12 labelled pixels
    np.testing.assert_allclose(weights, np.median(frequency) / frequency)
    assert resolve_class_weights([1, 2], tmp_path, ["background", "object"]) == (1.0, 2.0)
    assert resolve_class_weights(None, tmp_path, ["background", "object"]) is None


@pytest.mark.parametrize(("num_labels", "sigmoid"), [(2, True), (4, False)])
def test_epoch_metrics_match_the_numpy_confusion_matrix(num_labels: int, sigmoid: bool) -> None:
    names = ["background", "thing one", "b", "c"][:num_labels]
    metric = SegmentationMetrics(num_labels, sigmoid, names)
    reference = ConfusionMatrix(num_labels, IGNORE)
    for seed in range(2):
        labels, logits = _case(num_labels, sigmoid, seed=seed)
        labels = tf.where(tf.random.stateless_uniform(labels.shape, [seed, 1]) < 0.1, IGNORE, labels)
        metric.update_state(labels, logits)
        predictions = (logits.numpy()[..., 0] > 0).astype(int) if sigmoid else logits.numpy().argmax(-1)
        reference.update(labels.numpy(), predictions)
    result = {key: float(value) for key, value in metric.result().items()}
    report = reference.report(names)
    matrix = np.array(report["confusion_matrix"], float)
    dice = 2 * np.diag(matrix) / (matrix.sum(0) + matrix.sum(1))
    assert result["mean_iou"] == pytest.approx(report["mean_iou"]) and result["pixel_accuracy"] == pytest.approx(report["pixel_accuracy"])
    for index, name in enumerate(names):
        assert result[metric_key("iou", name)] == pytest.approx(report["per_class_iou"][name])
        assert result[metric_key("precision", name)] == pytest.approx(report["per_class_precision"][name])
        assert result[metric_key("recall", name)] == pytest.approx(report["per_class_recall"][name])
        assert result[metric_key("dice", name)] == pytest.approx(dice[index])
    assert metric_key("iou", "thing one") == "per_class_iou_thing_one"
    metric.reset_state()
    assert np.isnan(float(metric.result()["per_class_iou_background"]))


def test_epoch_metrics_sum_over_mirrored_replicas() -> None:
    """Two logical CPUs (set before TensorFlow starts, hence a subprocess): each replica sees half
    the batch, and the result equals one matrix over the whole batch."""
    code = textwrap.dedent(
        """
        import segflow, numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from segflow.model.metrics import SegmentationMetrics
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 3, size=(4, 8, 8)).astype(np.int32)
        logits = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            metric = SegmentationMetrics(3, False, ["a", "b", "c"])
        data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((labels, logits)).batch(4))
        for y, p in data:
            strategy.run(metric.update_state, (y, p))
        single = SegmentationMetrics(3, False, ["a", "b", "c"])
        single.update_state(labels, logits)
        assert strategy.num_replicas_in_sync == 2
        assert float(tf.reduce_sum(metric.matrix.read_value())) == labels.size
        for key, value in single.result().items():
            assert abs(float(metric.result()[key]) - float(value)) < 1e-12, key
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_class_weights_config(make_config: Callable[..., ExperimentConfig]) -> None:
    assert make_config(class_weights=[1, 2.5, 1, 1]).class_weights == [1.0, 2.5, 1.0, 1.0]
    assert make_config(class_weights="auto", loss="crossentropy+0.5*lovasz").class_weights == "auto"
    with pytest.raises(ConfigError, match="class_weights has 2 values but there are 4 class labels"):
        make_config(class_weights=[1, 2])
    with pytest.raises(ConfigError, match="non-negative"):
        make_config(class_weights=[1, -1, 1, 1])
    with pytest.raises(ConfigError, match="class_weights"):
        make_config(class_weights="median")
    with pytest.raises(ConfigError, match=r"loss: .*focal.* has no parameter 'gama'"):
        make_config(loss="focal(gama=2)")
