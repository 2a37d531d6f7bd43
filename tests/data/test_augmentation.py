"""Augmentation policies: every registered entry on uint8/uint16, grey/RGB image-mask pairs,
the YAML forms (mapping, list, OneOf/SomeOf), error messages, masks under geometric
transforms, imgaug names, BackgroundReplacer, and `segflow preview`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from segflow.data.augment import SQUARE_ONLY, apply_policy, build_policy, policy_dict
from segflow.config.experiment import validate_config
from segflow.utils.errors import ConfigError
from segflow.utils.registry import AUGMENTATIONS

CLASSES = {0, 1, 2}
IGNORE = 255


def background_folder(root: Path) -> Path:
    """Two background images of different sizes and channel counts."""
    folder = root / "backgrounds"
    folder.mkdir(exist_ok=True)
    cv2.imwrite(str(folder / "a.png"), np.full((40, 50, 3), (10, 200, 90), np.uint8))
    cv2.imwrite(str(folder / "b.png"), np.full((20, 20), 60000, np.uint16))
    return folder


def entry_params(name: str, root: Path) -> dict[str, Any]:
    """Parameters that make an entry fire every time (and its required ones)."""
    required: dict[str, dict[str, Any]] = {
        "RandomCrop": {"height": 0.5, "width": 0.75},
        "CenterCrop": {"height": 20, "width": 24},
        "MaskCrop": {"height": 0.5, "width": 0.5},
        "CoarseDropout": {"num_holes_range": (1, 2)},
    }
    if name == "BackgroundReplacer":
        return {"folder": str(background_folder(root)), "rate": 1.0, "erosion": 1, "augmenters": {"FlipLR": 1.0}}
    return {**required.get(name, {}), "p": 1.0}


def pair(dtype: type, channels: int, seed: int = 0, size: tuple[int, int] = (32, 40)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, np.iinfo(dtype).max, size=(*size, channels), endpoint=True).astype(dtype)
    mask = rng.integers(0, 3, size=size).astype(np.uint8)
    mask[:5, :6] = IGNORE  # an ignored region must stay an allowed label value
    return image, mask


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_every_entry_keeps_shapes_dtypes_and_labels(name: str, tmp_path: Path) -> None:
    policy = build_policy({name: entry_params(name, tmp_path)}, ignore_index=IGNORE)
    for dtype in (np.uint8, np.uint16):
        for channels in (1, 3):
            image, mask = pair(dtype, channels, size=(32, 32) if name in SQUARE_ONLY else (32, 40))
            out_image, out_mask = apply_policy(policy, image, mask, seed=7)
            assert out_image.shape == image.shape and out_image.dtype == image.dtype, (dtype, channels)
            assert out_mask.shape == mask.shape and out_mask.dtype == np.uint8, (dtype, channels)
            assert set(np.unique(out_mask)) <= CLASSES | {IGNORE}, (dtype, channels)
    assert json.dumps(policy_dict(policy))  # the preview's policy dump


def _geometric() -> list[str]:
    import albumentations as A

    # BackgroundReplacer is a DualTransform that never changes the mask (tested below).
    names = [name for name in AUGMENTATIONS.names() if name != "BackgroundReplacer"]
    return [name for name in names if isinstance(build_policy({name: entry_params(name, Path("unused"))}).transforms[0], A.DualTransform)]


@pytest.mark.parametrize("name", _geometric())
@pytest.mark.parametrize("ignore_index", [IGNORE, None])
def test_geometric_transforms_fill_new_mask_pixels_with_ignore_index(name: str, ignore_index: int | None) -> None:
    """A mask of one class: whatever a warp, crop or zoom does, every pixel is that class or
    the fill (ignore_index, else background 0), with the border constant where it can be set."""
    import inspect

    params = entry_params(name, Path("unused"))
    factory = AUGMENTATIONS.get(name)
    if "border_mode" in inspect.signature(factory).parameters or getattr(factory, "forwards_to", None):
        params["border_mode"] = cv2.BORDER_CONSTANT
    if name == "Affine":
        params.update(rotate=(30, 40), scale=(0.6, 0.7))
    policy = build_policy({name: params}, ignore_index=ignore_index)
    fill = IGNORE if ignore_index is not None else 0
    mask = np.ones((32, 32), np.uint8)
    for seed in range(3):
        _, out = apply_policy(policy, np.zeros((32, 32, 3), np.uint8), mask, seed=seed)
        assert set(np.unique(out)) <= {1, fill}
    if name in ("Affine", "ZoomOut"):
        assert fill in np.unique(out)  # there were new pixels, and they got the fill


def test_geometric_masks_use_nearest_and_reject_other_interpolation() -> None:
    with pytest.raises(ConfigError, match=r"augmentation.Affine.mask_interpolation"):
        build_policy({"Affine": {"mask_interpolation": cv2.INTER_LINEAR}})
    with pytest.raises(ConfigError, match=r"augmentation.Rotate.fill_mask: new mask pixels get ignore_index"):
        build_policy({"Rotate": {"fill_mask": 255}}, ignore_index=255)


def test_any_albumentations_transform_by_name_gets_the_mask_fill() -> None:
    policy = build_policy({"Rotate": {"limit": (40, 40), "p": 1.0}}, ignore_index=IGNORE)
    assert policy.transforms[0].fill_mask == IGNORE
    _, out = apply_policy(policy, np.zeros((32, 32, 1), np.uint8), np.ones((32, 32), np.uint8), seed=0)
    assert set(np.unique(out)) == {1, IGNORE}


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"augmentation.HorizntalFlip: unknown augmentation 'HorizntalFlip'; did you mean HorizontalFlip"):
        build_policy({"HorizntalFlip": {}})
    with pytest.raises(ConfigError, match=r"augmentation\[1\].OneOf.transforms\[0\].Flipup: .*did you mean .*Flipud"):
        build_policy([{"FlipLR": 0.5}, {"OneOf": {"transforms": [{"Flipup": {}}]}}])


def test_bad_parameters_name_the_entry_and_the_parameter() -> None:
    with pytest.raises(ConfigError, match=r"augmentation.Affine: unknown parameter 'rotat'; did you mean 'rotate'"):
        build_policy({"Affine": {"rotat": 10}})
    with pytest.raises(ConfigError, match=r"augmentation.Affine.rotate: .*valid"):  # albumentations' pydantic InitSchema
        build_policy({"Affine": {"rotate": "lots"}})
    with pytest.raises(ConfigError, match=r"augmentation\[0\].RandomCrop: missing parameter 'height', 'width'"):
        build_policy([{"RandomCrop": {}}])
    with pytest.raises(ConfigError, match=r"augmentation.Blur: expected a mapping of parameters or a probability"):
        build_policy({"Blur": "strong"})


def test_config_errors_name_the_key_path() -> None:
    raw = {"name": "x", "dataset": {"images": "i", "masks": "m"}, "augmentation": [{"SomeOf": {"n": 1, "transforms": {"GaussNoise": {"std_rang": 1}}}}]}
    with pytest.raises(ConfigError, match=r"augmentation\[0\].SomeOf.transforms.GaussNoise: unknown parameter 'std_rang'"):
        validate_config(raw)
    raw.update(shape=[64, 96, 3], augmentation=[{"OneOf": {"transforms": ["Transpose", "FlipLR"]}}])
    with pytest.raises(ConfigError, match=r"augmentation\[0\].OneOf.transforms\[0\].Transpose: Transpose swaps height and width, so it needs a square shape"):
        validate_config(raw)
    with pytest.raises(ValueError, match="augmentation changed the image size"):
        apply_policy(build_policy({"Transpose": 1.0}), *pair(np.uint8, 1))


def test_mapping_and_list_forms_and_groups() -> None:
    mapping = build_policy({"HorizontalFlip": {"p": 0.5}, "RandomRotate90": 0.5})
    listed = build_policy(["HorizontalFlip", {"RandomRotate90": {"p": 0.5}}])
    assert [type(t).__name__ for t in mapping.transforms] == [type(t).__name__ for t in listed.transforms] == ["HorizontalFlip", "RandomRotate90"]
    policy = build_policy(
        [
            {"FlipLR": {"p": 0.5}},
            {"OneOf": {"p": 1.0, "transforms": [{"Blur": {"sigma": [0.5, 1.0], "p": 1}}, {"Contrast": {"p": 1}}]}},
            {"SomeOf": {"n": 2, "transforms": {"FlipUD": 1, "Brightness": 1, "InvertBlend": 1}}},
            {"Sequential": {"p": 0.5, "transforms": ["Transpose"]}},
        ]
    )
    names = [type(t).__name__ for t in policy.transforms]
    assert names == ["HorizontalFlip", "OneOf", "SomeOf", "Sequential"]
    assert policy.transforms[1].p == 1.0 and policy.transforms[2].n == 2
    image, mask = pair(np.uint8, 3)
    first = apply_policy(policy, image, mask, seed=5)
    again = apply_policy(policy, image, mask, seed=5)
    np.testing.assert_array_equal(first[0], again[0])  # nested groups draw from their seeded streams


def test_one_of_picks_one_transform() -> None:
    policy = build_policy([{"OneOf": {"p": 1.0, "transforms": [{"FlipLR": 1.0}, {"FlipUD": 1.0}]}}])
    image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    outcomes = set()
    for seed in range(30):
        out, _ = apply_policy(policy, image, np.zeros((4, 4), np.uint8), seed)
        outcomes.add("lr" if np.array_equal(out, image[:, ::-1]) else "ud" if np.array_equal(out, image[::-1]) else "other")
    assert outcomes == {"lr", "ud"}


def test_imgaug_experiment_file_runs_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    """The older imgaug-style trainers' YAML: scalar probabilities, Affine with
    translate_percent per axis, rotate, shear and imgaug's mode/cval/order."""
    import yaml

    raw = yaml.safe_load(
        """
name: old
dataset: {images: i, masks: m}
ignore_index: 255
augmentation:
  Fliplr: 0.5
  Flipud: 0.5
  Affine:
    scale: [0.8, 1.5]
    translate_percent: {x: [-0.2, 0.2], y: [-0.2, 0.2]}
    rotate: [-16, 16]
    shear: [-16, 16]
    mode: constant
    cval: 0
    order: 1
  Blur: {sigma: [0, 1.5]}
  AdditiveGaussianNoise: {scale: [0, 12.75]}
  Contrast: {alpha: [0.75, 1.5]}
"""
    )
    config = validate_config(raw)
    policy = build_policy(config.augmentation, ignore_index=config.ignore_index)
    flip, flop, affine, blur, noise, contrast = policy.transforms
    assert (type(flip).__name__, flip.p, type(flop).__name__) == ("HorizontalFlip", 0.5, "VerticalFlip")
    assert affine.border_mode == cv2.BORDER_CONSTANT and affine.fill_mask == 255 and affine.rotate == (-16, 16)
    assert type(blur).__name__ == "GaussianBlur" and noise.std_range == pytest.approx((0.0, 0.05))
    logged = capsys.readouterr().err
    assert "Fliplr: imgaug name, applied as HorizontalFlip" in logged and "Affine(cval=0, mode='constant', order=1)" in logged and "0..255 units" in logged
    image, mask = pair(np.uint8, 1)
    out_image, out_mask = apply_policy(policy, image, mask, seed=1)
    assert out_image.shape == image.shape and set(np.unique(out_mask)) <= CLASSES | {IGNORE}


def test_background_replacer(tmp_path: Path) -> None:
    folder = background_folder(tmp_path)
    mask = np.zeros((30, 30), np.uint8)
    mask[10:20, 10:20] = 1
    image = np.full((30, 30, 3), 5, np.uint8)
    policy = build_policy({"BackgroundReplacer": {"folder": str(folder), "rate": 1.0, "erosion": 2}})
    replaced = set()
    for seed in range(6):
        out, out_mask = apply_policy(policy, image, mask, seed)
        np.testing.assert_array_equal(out_mask, mask)
        np.testing.assert_array_equal(out[8:22, 8:22], image[8:22, 8:22])  # objects and the eroded 2-pixel rim keep theirs
        replaced.add(tuple(out[0, 0]))
    assert replaced == {(90, 200, 10), (233, 233, 233)}  # cv2 wrote BGR; 16-bit grey 60000/65535 as 8-bit RGB
    never = build_policy({"BackgroundReplacer": {"folder": str(folder), "rate": 0.0}})
    np.testing.assert_array_equal(apply_policy(never, image, mask, 0)[0], image)
    with pytest.raises(ConfigError, match=r"augmentation.BackgroundReplacer.augmenters.Blurr: unknown augmentation 'Blurr'; did you mean Blur"):
        build_policy({"BackgroundReplacer": {"folder": str(folder), "augmenters": {"Blurr": {}}}})
    # The folder is read at first use, not when the config is read: a cluster path still validates.
    assert build_policy({"BackgroundReplacer": {"folder": "/mnt/cluster-only/backgrounds"}}) is not None


def test_mask_crop_centres_on_labelled_pixels() -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[50:54, 6:10] = 2
    mask[0:8, 0:8] = IGNORE
    policy = build_policy({"MaskCrop": {"height": 16, "width": 16}}, ignore_index=IGNORE)
    for seed in range(5):
        _, out = apply_policy(policy, np.zeros((64, 64, 1), np.uint8), mask, seed)
        assert 2 in np.unique(out) and IGNORE not in np.unique(out)


def test_preview_writes_a_png_grid_and_the_policy(tmp_path: Path) -> None:
    import yaml
    from PIL import Image

    from segflow.cli import main
    from segflow.data.demo_data import write_demo_dataset

    data = write_demo_dataset(tmp_path / "data", count=6, size=48)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "preview",
                "dataset": {"images": str(data / "images"), "masks": str(data / "masks")},
                "classes": 4,
                "shape": [48, 48, 3],
                "augmentation": [{"FlipLR": 0.5}, {"OneOf": {"p": 1.0, "transforms": [{"ZoomOut": 1.0}, {"Affine": {"rotate": [-30, 30], "p": 1.0}}]}}],
            }
        )
    )
    assert main(["preview", str(config), "-n", "4", "-o", str(tmp_path / "grid.png")]) == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.format == "PNG" and grid.size[0] > grid.size[1] > 0
    policy = json.loads((tmp_path / "grid.policy.json").read_text())
    assert policy["transform"]["transforms"][1]["__class_fullname__"] == "OneOf"
