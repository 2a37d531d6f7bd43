"""Augmentation policies: the config's `augmentation` as an albumentations Compose.

Two YAML forms. The mapping `{HorizontalFlip: {p: 0.5}, Affine: {rotate: [-20, 20]}}` applies
its entries in order; the list form `[{FlipLR: 0.5}, {OneOf: {p: 0.3, transforms: [...]}}]`
adds repeated entries and Compose / OneOf / SomeOf / Sequential groups with their own `p`.
An entry is a registered name (AUGMENTATIONS: the names users of YAML-driven trainers know,
and imgaug's older names) or any albumentations transform by class name; its parameters are
checked against the signature when the config is read, so a typo fails before training.

Masks: nearest interpolation only, and every transform that fills new mask pixels fills
them with `ignore_index` (background 0 when there is none), never with a real class.
"""
from __future__ import annotations

import difflib
import hashlib
import inspect
import warnings
from typing import Any, Callable

import albumentations as A
import cv2
import numpy as np

from segflow.utils.errors import ConfigError
from segflow.utils.registry import AUGMENTATIONS
from segflow.utils.runtime import log

# Groups of transforms: their `transforms` parameter is a nested policy (mapping or list form).
CONTAINERS: dict[str, type] = {"Compose": A.Compose, "OneOf": A.OneOf, "SomeOf": A.SomeOf, "Sequential": A.Sequential}

for _name in (
    "HorizontalFlip",
    "VerticalFlip",
    "RandomRotate90",
    "Transpose",
    "ElasticTransform",
    "GridDistortion",
    "RandomBrightnessContrast",
    "RandomGamma",
    "GaussNoise",
    "GaussianBlur",
    "CoarseDropout",
    "ColorJitter",
):
    AUGMENTATIONS.add(_name, getattr(A, _name))

# Transforms that swap height and width: only for a square model input (the trainer's
# batches have one static shape).
SQUARE_ONLY = frozenset({"Transpose", "RandomRotate90", "D4", "SquareSymmetry"})

# Warps that move content: mirror the border (image and mask together, so mirrored objects
# keep their labels) unless the entry sets border_mode; with a constant border, new mask
# pixels get fill_mask (ignore_index or 0).
_BORDER_DEFAULTS: dict[str, dict[str, Any]] = {
    "Affine": {"border_mode": cv2.BORDER_REFLECT_101},
    "ElasticTransform": {"border_mode": cv2.BORDER_REFLECT_101},
    "GridDistortion": {"border_mode": cv2.BORDER_REFLECT_101},
}


def _resize(array: np.ndarray, height: int, width: int, interpolation: int) -> np.ndarray:
    """cv2.resize that keeps a trailing single channel (cv2 drops it)."""
    out = cv2.resize(array, (width, height), interpolation=interpolation)
    return out[..., None] if array.ndim == 3 and out.ndim == 2 else out


def _value_range(image: np.ndarray) -> float:
    """The brightest value of an image's dtype as albumentations sees it (float images are [0, 1])."""
    return float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 1.0


class _WindowCrop(A.DualTransform):
    """Crop a window and resize it back to the input's size: augmentation runs at the model
    size, so a crop must not change the shape (image linear, mask nearest)."""

    def __init__(self, height: float, width: float, p: float = 1.0) -> None:
        super().__init__(p=p)
        if height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive (pixels, or a share of the image when at most 1), got {height}, {width}")
        self.height, self.width = height, width

    def window(self, shape: tuple[int, ...]) -> tuple[int, int]:
        rows, cols = shape[:2]
        height = round(self.height * rows) if self.height <= 1 else int(self.height)
        width = round(self.width * cols) if self.width <= 1 else int(self.width)
        return max(1, min(height, rows)), max(1, min(width, cols))

    def corner(self, data: dict[str, Any], height: int, width: int) -> tuple[int, int]:
        raise NotImplementedError

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = self.window(params["shape"])
        top, left = self.corner(data, height, width)
        return {"top": top, "left": left, "height": height, "width": width}

    def apply(self, img: np.ndarray, top: int, left: int, height: int, width: int, **params: Any) -> np.ndarray:
        return _resize(img[top : top + height, left : left + width], img.shape[0], img.shape[1], cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, top: int, left: int, height: int, width: int, **params: Any) -> np.ndarray:
        return _resize(mask[top : top + height, left : left + width], mask.shape[0], mask.shape[1], cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width")


class RandomCropResize(_WindowCrop):
    """Crop a window (pixels, or a share when <= 1) at a random place, resized back to the input size."""

    def corner(self, data: dict[str, Any], height: int, width: int) -> tuple[int, int]:
        rows, cols = data["image"].shape[:2]
        return self.py_random.randint(0, rows - height), self.py_random.randint(0, cols - width)


class CenterCropResize(_WindowCrop):
    """Crop the central window (pixels, or a share when <= 1), resized back to the input size."""

    def corner(self, data: dict[str, Any], height: int, width: int) -> tuple[int, int]:
        rows, cols = data["image"].shape[:2]
        return (rows - height) // 2, (cols - width) // 2


class MaskCrop(_WindowCrop):
    """Crop a window centred on a random labelled pixel (not background, not ignore_index),
    resized back to the input size; a random window when the mask has none."""

    def __init__(self, height: float, width: float, background: int = 0, ignore_index: int | None = None, p: float = 1.0) -> None:
        super().__init__(height, width, p)
        self.background, self.ignore_index = background, ignore_index

    def corner(self, data: dict[str, Any], height: int, width: int) -> tuple[int, int]:
        mask = data["mask"]
        rows, cols = mask.shape[:2]
        labelled = mask != self.background
        if self.ignore_index is not None:
            labelled &= mask != self.ignore_index
        candidates = np.flatnonzero(labelled)
        if candidates.size == 0:
            return self.py_random.randint(0, rows - height), self.py_random.randint(0, cols - width)
        row, col = divmod(int(candidates[self.py_random.randrange(candidates.size)]), cols)
        return min(max(row - height // 2, 0), rows - height), min(max(col - width // 2, 0), cols - width)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "background", "ignore_index")


class InvertBlend(A.ImageOnlyTransform):
    """Blend the image with its negative: (1 - a) x image + a x (max - image), a drawn from `alpha`."""

    def __init__(self, alpha: tuple[float, float] = (0.0, 1.0), p: float = 0.5) -> None:
        super().__init__(p=p)
        if not 0.0 <= alpha[0] <= alpha[1] <= 1.0:
            raise ValueError(f"alpha must be a range within [0, 1], got {alpha}")
        self.alpha = tuple(alpha)

    def get_params(self) -> dict[str, Any]:
        return {"weight": self.py_random.uniform(*self.alpha)}

    def apply(self, img: np.ndarray, weight: float, **params: Any) -> np.ndarray:
        top = _value_range(img)
        blended = (1.0 - weight) * img.astype(np.float32) + weight * (top - img.astype(np.float32))
        return np.clip(blended, 0, top).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("alpha",)


def _kelvin_to_rgb(kelvin: float) -> np.ndarray:
    """White point of a black body (Tanner Helland's fit), each channel in [0, 1]."""
    t = kelvin / 100.0
    red = 1.0 if t <= 66 else 1.29293618606 * (t - 60) ** -0.1332047592
    green = 0.39008157876 * np.log(t) - 0.63184144378 if t <= 66 else 1.12989086089 * (t - 60) ** -0.0755148492
    blue = 1.0 if t >= 66 else (0.0 if t <= 19 else 0.54320678911 * np.log(t - 10) - 1.19625408914)
    return np.clip(np.array([red, green, blue], np.float32), 0.0, 1.0)


class ChangeColorTemperature(A.ImageOnlyTransform):
    """Tint RGB images as if lit at a colour temperature drawn from `kelvin` (grey images unchanged)."""

    def __init__(self, kelvin: tuple[float, float] = (3000.0, 10000.0), p: float = 0.5) -> None:
        super().__init__(p=p)
        if not 1000.0 <= kelvin[0] <= kelvin[1] <= 40000.0:
            raise ValueError(f"kelvin must be a range within [1000, 40000], got {kelvin}")
        self.kelvin = tuple(kelvin)

    def get_params(self) -> dict[str, Any]:
        return {"temperature": self.py_random.uniform(*self.kelvin)}

    def apply(self, img: np.ndarray, temperature: float, **params: Any) -> np.ndarray:
        if img.shape[-1] != 3:
            return img
        gains = _kelvin_to_rgb(temperature) / _kelvin_to_rgb(6600.0)  # 6600 K: neutral
        return np.clip(img.astype(np.float32) * (gains / gains.max()), 0, _value_range(img)).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("kelvin",)


class BackgroundReplacer(A.DualTransform):
    """Replace background pixels (mask == `background`) with a random image from `folder`,
    optionally augmented by its own `augmenters`; `erosion` pixels around objects keep their
    own background. The folder (a path or gs:// / s3:// URI) is read once, at first use, so
    a config naming a cluster path still validates and compiles elsewhere."""

    def __init__(
        self,
        folder: str,
        rate: float = 0.5,
        background: int = 0,
        erosion: int = 0,
        augmenters: dict[str, Any] | list[Any] | None = None,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__(p=rate)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {rate}")
        if erosion < 0:
            raise ValueError(f"erosion must be a non-negative pixel count, got {erosion}")
        self.folder, self.rate, self.background, self.erosion, self.augmenters = folder, rate, background, erosion, augmenters
        nested = build_policy(augmenters or {}, ignore_index=ignore_index, path="augmenters")
        self.transforms = [] if nested is None else [nested]  # seed_policy gives it its own stream
        self._images: list[np.ndarray] | None = None  # a policy belongs to one thread: no lock

    def _backgrounds(self) -> list[np.ndarray]:
        if self._images is None:
            from segflow.utils import storage
            from segflow.utils.io import decode_image

            files = sorted(entry.location for entry in storage.list_folder(self.folder) if not entry.is_dir and not entry.name.startswith("."))
            self._images = [decode_image(storage.read_bytes(location), location) for location in files]
            if not self._images:
                raise ValueError(f"BackgroundReplacer: no images in {self.folder}")
        return self._images

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        images = self._backgrounds()
        region = data["mask"] == self.background
        if self.erosion:
            kernel = np.ones((2 * self.erosion + 1, 2 * self.erosion + 1), np.uint8)
            region = cv2.erode(region.astype(np.uint8), kernel).astype(bool)
        return {"replacement": images[self.py_random.randrange(len(images))], "region": region}

    def _matched(self, replacement: np.ndarray, img: np.ndarray) -> np.ndarray:
        """The background image at the input's size, channels, dtype and value range."""
        from segflow.data.preprocessing import effective_value_max

        pixels = replacement[..., :3].astype(np.float32) / effective_value_max(int(replacement.max()))
        if img.shape[-1] == 1 and pixels.shape[-1] == 3:
            pixels = pixels.mean(axis=-1, keepdims=True)
        elif img.shape[-1] == 3 and pixels.shape[-1] == 1:
            pixels = np.repeat(pixels, 3, axis=-1)
        pixels = _resize(pixels, img.shape[0], img.shape[1], cv2.INTER_LINEAR)
        top = _value_range(img)
        scaled = pixels * top
        matched = np.clip(np.rint(scaled) if top > 1 else scaled, 0, top).astype(img.dtype)
        if self.transforms:
            matched = self.transforms[0](image=matched)["image"]
        return matched

    def apply(self, img: np.ndarray, replacement: np.ndarray, region: np.ndarray, **params: Any) -> np.ndarray:
        return np.where(region[..., None], self._matched(replacement, img), img)

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        return mask  # background stays background

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("folder", "rate", "background", "erosion", "augmenters")


def _imgaug_note(name: str, equivalent: str) -> None:
    log(f"augmentation {name}: imgaug name, applied as {equivalent}")


@AUGMENTATIONS.register("FlipLR")
def flip_lr(p: float = 0.5) -> A.BasicTransform:
    """Mirror left-right (albumentations HorizontalFlip)."""
    return A.HorizontalFlip(p=p)


@AUGMENTATIONS.register("FlipUD")
def flip_ud(p: float = 0.5) -> A.BasicTransform:
    """Mirror top-bottom (albumentations VerticalFlip)."""
    return A.VerticalFlip(p=p)


@AUGMENTATIONS.register("Fliplr")
def fliplr(p: float = 0.5) -> A.BasicTransform:
    """imgaug's Fliplr: HorizontalFlip."""
    _imgaug_note("Fliplr", f"HorizontalFlip(p={p})")
    return A.HorizontalFlip(p=p)


@AUGMENTATIONS.register("Flipud")
def flipud(p: float = 0.5) -> A.BasicTransform:
    """imgaug's Flipud: VerticalFlip."""
    _imgaug_note("Flipud", f"VerticalFlip(p={p})")
    return A.VerticalFlip(p=p)


_IMGAUG_MODES = {"constant": cv2.BORDER_CONSTANT, "edge": cv2.BORDER_REPLICATE, "symmetric": cv2.BORDER_REFLECT, "reflect": cv2.BORDER_REFLECT_101, "wrap": cv2.BORDER_WRAP}
_IMGAUG_ORDERS = {0: cv2.INTER_NEAREST, 1: cv2.INTER_LINEAR, 3: cv2.INTER_CUBIC}


@AUGMENTATIONS.register("Affine")
def affine(cval: float | None = None, mode: str | None = None, order: int | None = None, **params: Any) -> A.BasicTransform:
    """Scale, translate, rotate, shear (albumentations Affine; imgaug's cval, mode and order too)."""
    imgaug = {"cval": cval, "mode": mode, "order": order}
    if cval is not None:
        params["fill"] = cval
    if mode is not None:
        if mode not in _IMGAUG_MODES:
            raise ValueError(f"mode must be one of {', '.join(_IMGAUG_MODES)}, got {mode!r}")
        params["border_mode"] = _IMGAUG_MODES[mode]
    if order is not None:
        if order not in _IMGAUG_ORDERS:
            raise ValueError(f"order must be one of {', '.join(map(str, _IMGAUG_ORDERS))}, got {order}")
        params["interpolation"] = _IMGAUG_ORDERS[order]
    given = {key: value for key, value in imgaug.items() if value is not None}
    if given:
        _imgaug_note(f"Affine({', '.join(f'{key}={value!r}' for key, value in given.items())})", "albumentations Affine fill / border_mode / interpolation")
    return A.Affine(**params)


affine.forwards_to = A.Affine  # type: ignore[attr-defined]


@AUGMENTATIONS.register("RandomCrop")
def random_crop(height: float, width: float, p: float = 1.0) -> A.BasicTransform:
    """A random window (pixels, or a share when <= 1), resized back to the input size."""
    return RandomCropResize(height, width, p)


@AUGMENTATIONS.register("CenterCrop")
def center_crop(height: float, width: float, p: float = 1.0) -> A.BasicTransform:
    """The central window (pixels, or a share when <= 1), resized back to the input size."""
    return CenterCropResize(height, width, p)


AUGMENTATIONS.add("MaskCrop", MaskCrop)
AUGMENTATIONS.add("InvertBlend", InvertBlend)
AUGMENTATIONS.add("ChangeColorTemperature", ChangeColorTemperature)
AUGMENTATIONS.add("BackgroundReplacer", BackgroundReplacer)


@AUGMENTATIONS.register("ZoomIn")
def zoom_in(scale: tuple[float, float] = (1.0, 1.5), p: float = 0.5) -> A.BasicTransform:
    """Magnify about the centre by a factor drawn from `scale` (>= 1): no new pixels."""
    if scale[0] < 1.0:
        raise ValueError(f"scale must be at least 1 (ZoomOut shrinks), got {scale}")
    return A.Affine(scale=scale, keep_ratio=True, p=p)


@AUGMENTATIONS.register("ZoomOut")
def zoom_out(scale: tuple[float, float] = (0.67, 1.0), fill: float = 0.0, fill_mask: float = 0.0, p: float = 0.5) -> A.BasicTransform:
    """Shrink about the centre by a factor drawn from `scale` (<= 1); the new border is `fill`
    in the image and ignore_index (or background) in the mask."""
    if scale[1] > 1.0:
        raise ValueError(f"scale must be at most 1 (ZoomIn magnifies), got {scale}")
    return A.Affine(scale=scale, keep_ratio=True, border_mode=cv2.BORDER_CONSTANT, fill=fill, fill_mask=fill_mask, p=p)


@AUGMENTATIONS.register("Blur")
def blur(sigma: tuple[float, float] | None = None, blur_limit: tuple[int, int] = (3, 7), p: float = 0.5) -> A.BasicTransform:
    """Gaussian blur with sigma drawn from `sigma` (imgaug style), else a box blur of `blur_limit` pixels."""
    if sigma is not None:
        return A.GaussianBlur(sigma_limit=sigma, blur_limit=0, p=p)
    return A.Blur(blur_limit=blur_limit, p=p)


@AUGMENTATIONS.register("AdditiveGaussianNoise")
def additive_gaussian_noise(scale: tuple[float, float] = (0.0, 0.05), per_channel: bool = False, p: float = 0.5) -> A.BasicTransform:
    """Gaussian noise, standard deviation drawn from `scale` as a share of the value range
    (imgaug's 0..255 units are read as such when above 1)."""
    low, high = scale
    if high > 1.0:
        low, high = low / 255.0, high / 255.0
        log(f"augmentation AdditiveGaussianNoise: scale {list(scale)} read in imgaug's 0..255 units, std_range ({low:.3f}, {high:.3f})")
    return A.GaussNoise(std_range=(low, high), per_channel=per_channel, p=p)


@AUGMENTATIONS.register("Contrast")
def contrast(alpha: tuple[float, float] = (0.75, 1.5), p: float = 0.5) -> A.BasicTransform:
    """Multiply contrast by a factor drawn from `alpha` (imgaug LinearContrast)."""
    return A.RandomBrightnessContrast(brightness_limit=(0.0, 0.0), contrast_limit=(alpha[0] - 1.0, alpha[1] - 1.0), p=p)


@AUGMENTATIONS.register("Brightness")
def brightness(limit: tuple[float, float] = (-0.2, 0.2), p: float = 0.5) -> A.BasicTransform:
    """Add a brightness offset drawn from `limit` (a share of the value range)."""
    return A.RandomBrightnessContrast(brightness_limit=limit, contrast_limit=(0.0, 0.0), p=p)


@AUGMENTATIONS.register("Saturation")
def saturation(factor: tuple[float, float] = (0.5, 1.5), p: float = 0.5) -> A.BasicTransform:
    """Multiply colour saturation by a factor drawn from `factor` (grey images unchanged)."""
    return A.ColorJitter(brightness=(1.0, 1.0), contrast=(1.0, 1.0), saturation=factor, hue=(0.0, 0.0), p=p)


@AUGMENTATIONS.register("Compression")
def compression(quality: tuple[int, int] = (50, 95), p: float = 0.5) -> A.BasicTransform:
    """JPEG artefacts at a quality drawn from `quality` (1..100)."""
    return A.ImageCompression(compression_type="jpeg", quality_range=quality, p=p)


@AUGMENTATIONS.register("Cutout")
def cutout(num_holes: tuple[int, int] = (1, 4), size: tuple[float, float] = (0.05, 0.2), fill: float = 0.0, p: float = 0.5) -> A.BasicTransform:
    """Erase `num_holes` rectangles of `size` (a share of the side) in the image; the mask keeps its labels."""
    return A.CoarseDropout(num_holes_range=num_holes, hole_height_range=size, hole_width_range=size, fill=fill, p=p)


def _signature(factory: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The parameters an entry takes; a factory that forwards **params adds its target's."""
    parameters = dict(inspect.signature(factory).parameters)
    forwarded = getattr(factory, "forwards_to", None)
    if forwarded is not None:
        parameters.update(inspect.signature(forwarded).parameters)
    return {name: parameter for name, parameter in parameters.items() if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) and name != "self"}


def _albumentations_class(name: str) -> type | None:
    entry = getattr(A, name, None)
    if isinstance(entry, type) and issubclass(entry, A.BasicTransform) and name not in CONTAINERS:
        return entry
    return None


def _known_names() -> list[str]:
    return sorted(set(AUGMENTATIONS.names()) | set(CONTAINERS) | {name for name in dir(A) if _albumentations_class(name)})


def _entries(spec: Any, path: str) -> list[tuple[str, dict[str, Any], str]]:
    """(name, params, key path) of each entry of the mapping or list form."""
    if isinstance(spec, dict):
        items = [(name, params, f"{path}.{name}") for name, params in spec.items()]
    elif isinstance(spec, list):
        items = []
        for index, item in enumerate(spec):
            if isinstance(item, str):
                items.append((item, {}, f"{path}[{index}].{item}"))
            elif isinstance(item, dict) and len(item) == 1:
                ((name, params),) = item.items()
                items.append((name, params, f"{path}[{index}].{name}"))
            else:
                raise ConfigError(f"{path}[{index}]: expected a transform name or a one-key mapping {{Name: {{parameters}}}}, got {item!r}")
    else:
        raise ConfigError(f"{path}: expected a mapping {{Name: {{parameters}}}} or a list of them, got {type(spec).__name__}")
    entries = []
    for name, params, key in items:
        if params is None:
            params = {}
        elif isinstance(params, (int, float)) and not isinstance(params, bool):
            params = {"p": params}  # `Fliplr: 0.5`, as imgaug-style files write it
        elif not isinstance(params, dict):
            raise ConfigError(f"{key}: expected a mapping of parameters or a probability, got {params!r}")
        entries.append((str(name), dict(params), key))
    return entries


def _check_parameters(name: str, factory: Callable[..., Any], params: dict[str, Any], path: str) -> dict[str, inspect.Parameter]:
    signature = _signature(factory)
    for key in params:
        if key not in signature:
            close = difflib.get_close_matches(key, list(signature), n=2)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"{path}: unknown parameter {key!r}{hint} ({name} takes {', '.join(signature) or 'no parameters'})")
    missing = [key for key, parameter in signature.items() if parameter.default is inspect.Parameter.empty and key not in params]
    if missing:
        raise ConfigError(f"{path}: missing parameter {', '.join(map(repr, missing))}")
    if params.get("mask_interpolation", cv2.INTER_NEAREST) != cv2.INTER_NEAREST:
        raise ConfigError(f"{path}.mask_interpolation: masks are always resampled with nearest interpolation ({cv2.INTER_NEAREST}); leave it out")
    return signature


def _construct(factory: Callable[..., Any], kwargs: dict[str, Any], path: str) -> A.BasicTransform:
    """Call a factory; albumentations' pydantic errors become one line per parameter."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            transform = factory(**kwargs)
    except ConfigError as error:  # from a nested policy (BackgroundReplacer's augmenters): prefix its path
        raise ConfigError(f"{path}.{error}") from None
    except (TypeError, ValueError) as error:
        cause = error.__cause__ if error.__cause__ is not None else error
        details = getattr(cause, "errors", None)
        if callable(details):
            lines = sorted({f"{path}.{item['loc'][0]}: {item['msg']} (got {item.get('input')!r})" if item["loc"] else f"{path}: {item['msg']}" for item in details()})
            raise ConfigError("; ".join(lines)) from None
        raise ConfigError(f"{path}: {error}") from None
    unknown = [str(w.message) for w in caught if "not valid for transform" in str(w.message)]
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}")
    return transform


def _build(name: str, params: dict[str, Any], path: str, ignore_index: int | None) -> A.BasicTransform:
    if name in CONTAINERS:
        container = CONTAINERS[name]
        if "transforms" not in params:
            raise ConfigError(f"{path}: missing parameter 'transforms' (a list or mapping of transforms)")
        _check_parameters(name, container.__init__, params, path)
        rest = {key: value for key, value in params.items() if key != "transforms"}
        children = [_build(child, child_params, key, ignore_index) for child, child_params, key in _entries(params["transforms"], f"{path}.transforms")]
        if not children:
            raise ConfigError(f"{path}.transforms: empty")
        return _construct(container, {"transforms": children, **rest}, path)
    factory: Callable[..., Any] | None = AUGMENTATIONS.get(name) if name in AUGMENTATIONS else _albumentations_class(name)
    if factory is None:
        close = difflib.get_close_matches(name, _known_names(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"{path}: unknown augmentation {name!r}{hint} (registered: {', '.join(AUGMENTATIONS.names())}; "
            "or any albumentations transform by class name; Compose, OneOf, SomeOf, Sequential group them)"
        )
    signature = _check_parameters(name, factory, params, path)
    kwargs = {**_BORDER_DEFAULTS.get(name, {}), **params}
    fill = mask_fill(ignore_index)
    if "fill_mask" in signature and signature["fill_mask"].default is not None:
        if "fill_mask" in params:  # one rule everywhere, whoever builds the policy
            raise ConfigError(f"{path}.fill_mask: new mask pixels get ignore_index (background 0 without one), never a class; leave it out")
        kwargs["fill_mask"] = fill
    if "ignore_index" in signature:
        kwargs.setdefault("ignore_index", ignore_index)
    return _construct(factory, kwargs, path)


def entry_names(spec: dict[str, Any] | list[Any], path: str = "augmentation") -> dict[str, str]:
    """Key path -> transform name of every entry, groups' members included."""
    names = {}
    for name, params, key in _entries(spec, path):
        names[key] = name
        if name in CONTAINERS and "transforms" in params:
            names.update(entry_names(params["transforms"], f"{key}.transforms"))
    return names


def build_policy(spec: dict[str, Any] | list[Any], seed: int | None = None, ignore_index: int | None = None, path: str = "augmentation") -> A.Compose | None:
    """A Compose of the config's `augmentation` (mapping or list form), or None when empty.
    `ignore_index` is what geometric transforms write into new mask pixels (else 0)."""
    transforms = [_build(name, params, key, ignore_index) for name, params, key in _entries(spec, path)]
    return A.Compose(transforms, seed=seed) if transforms else None


def policy_dict(policy: A.Compose | None) -> dict[str, Any]:
    """The resolved policy as albumentations serialises it (every parameter, defaults included)."""
    return {} if policy is None else A.to_dict(policy)


def mask_fill(ignore_index: int | None) -> int:
    """The label of mask pixels that no image pixel stands for (geometric transforms' new
    pixels, padding): ignore_index, or background 0 without one; never a real class."""
    return 0 if ignore_index is None else ignore_index


def example_seed(seed: int, epoch: int, filename: str) -> int:
    """The augmentation seed of one example in one epoch: a function of the data alone, so
    the draws do not depend on which thread or in which order the example is processed."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{filename}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def seed_policy(transform: Any, seed: int) -> None:
    """Give every transform of a (nested) policy its own random stream derived from `seed`.
    albumentations' own `set_random_seed` hands all children the same seed, which makes
    e.g. HorizontalFlip and VerticalFlip with equal p always fire together."""
    transform.set_random_seed(seed)
    # Only nested transforms: ColorJitter keeps its colour functions in `transforms` too.
    children = [child for child in getattr(transform, "transforms", None) or [] if isinstance(child, A.BasicTransform)]
    for child, child_seed in zip(children, np.random.SeedSequence(seed).generate_state(len(children))):
        seed_policy(child, int(child_seed))


def apply_policy(policy: A.Compose | None, image: np.ndarray, mask: np.ndarray, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Augment an HxWxC image (float32 in [0, 1] as the trainer has it, uint8, or uint16:
    albumentations has no uint16 path, so it goes through float) and its uint8 HxW mask; the
    image keeps its dtype. With `seed` the draws are reproducible (the caller must not share
    `policy` between threads then)."""
    if policy is None:
        return image, mask
    if seed is not None:
        seed_policy(policy, seed)
    wide = image.dtype == np.uint16
    pixels = image.astype(np.float32) / 65535.0 if wide else image
    out = policy(image=pixels, mask=mask)
    if out["image"].shape[:2] != image.shape[:2]:
        raise ValueError(f"augmentation changed the image size from {image.shape[:2]} to {out['image'].shape[:2]}: every transform must keep the model size")
    result = np.clip(np.rint(out["image"] * 65535.0), 0, 65535).astype(np.uint16) if wide else out["image"].astype(image.dtype, copy=False)
    return np.ascontiguousarray(result), np.ascontiguousarray(out["mask"], np.uint8)
