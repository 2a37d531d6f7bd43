"""The experiment config: a YAML file validated into typed, frozen pydantic models.

Every key is checked before any work starts, so a typo in a 20-minute run fails in
the first second with the key path that is wrong.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from segflow.model.losses import parse_loss
from segflow.utils.errors import ConfigError
from segflow.utils.registry import (
    ARCHITECTURES,
    BACKBONES,
    EXPORT_FORMATS,
    OPTIMIZERS,
    SCHEDULES,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


DEFAULT_EVAL_SPLIT = 0.2


class SplitFolders(_Strict):
    """The image and mask folders of one named split (a dataset's official eval or test set)."""

    images: str = Field(description="the split's image folder (local path or gs:// / s3:// URI)")
    masks: str = Field(description="the split's mask folder; each mask has the file stem of its image")


class DatasetConfig(_Strict):
    """Where the data is (local paths or gs:// / s3:// URIs) and how it is split: a hash split
    of `images`/`masks` (eval_split), named `eval`/`test` folders, or k folds."""

    images: str = Field(
        description="folder of the images (PNG, JPEG, TIFF or BMP; 8 or 16 bit; 1, 3 or 4 channels), a local path or a gs:// / s3:// URI; subfolders are not read"
    )
    masks: str = Field(
        description="folder of the masks, one per image with the same file stem (the extension may differ); values are class ids, or those of mask_values"
    )
    eval_split: float | None = Field(
        None, gt=0.0, lt=1.0, description=f"share of examples (or groups) in the eval split (exact, or on average with assignment: stable); null: {DEFAULT_EVAL_SPLIT} unless eval folders or folds are given"
    )
    group_by: str | None = Field(
        None, description="regex on the file stem; files whose match is equal stay in one split (video sequence, patient, slide)"
    )
    multipage: Literal["quarantine", "expand"] = Field(
        "quarantine", description="multi-page TIFFs: quarantined, or one example per page (image and mask page counts must match)"
    )
    eval: SplitFolders | None = Field(None, description="the eval split's own folders instead of a hash split of images/masks")
    test: SplitFolders | None = Field(
        None, description="a test split: scored by the evaluator only, never used to choose checkpoints or thresholds"
    )
    folds: int | None = Field(
        None, ge=2, le=20, description="k-fold cross-validation over images/masks: one trainer per fold, fold ids from a hash of the file name (group)"
    )
    folds_to_train: list[int] | None = Field(None, min_length=1, description="train only these folds (ids from 0); null: all")
    assignment: Literal["exact", "stable"] = Field(
        "exact",
        description="how the hash split and folds are drawn: exact (the eval share and fold sizes exact over the files present; "
        "adding files can move others) or stable (each file's split and fold from its own name alone: it never moves as data "
        "grows, so a model is never scored on a file it trained on; shares exact only on average). exact suits a fixed dataset, "
        "stable one that grows between runs",
    )

    @model_validator(mode="after")
    def _split_choice(self) -> "DatasetConfig":
        if self.eval is not None and self.eval_split is not None:
            raise ValueError("eval_split and eval are exclusive: the eval folders are the eval split")
        if self.folds is not None and (self.eval is not None or self.eval_split is not None):
            raise ValueError("folds replaces the eval split: remove eval / eval_split (each fold is the eval split of its trainer)")
        if self.folds_to_train is not None:
            if self.folds is None:
                raise ValueError("folds_to_train needs folds")
            wrong = sorted({fold for fold in self.folds_to_train if not 0 <= fold < self.folds})
            if wrong:
                raise ValueError(f"folds_to_train: fold ids {wrong} outside 0..{self.folds - 1}")
            if len(set(self.folds_to_train)) != len(self.folds_to_train):
                raise ValueError("folds_to_train: a fold is listed twice")
        return self

    @property
    def eval_share(self) -> float:
        """The hash split's eval share (eval_split, or its default)."""
        return DEFAULT_EVAL_SPLIT if self.eval_split is None else self.eval_split

    def trained_folds(self) -> list[int]:
        """The folds a k-fold run trains (none without folds)."""
        if self.folds is None:
            return []
        return sorted(self.folds_to_train) if self.folds_to_train is not None else list(range(self.folds))

    @field_validator("group_by")
    @classmethod
    def _group_by(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"not a valid regular expression: {error}") from None
        return value


class NormalizationConfig(_Strict):
    """How pixels (already scaled to [0, 1] by the bit depth) become network inputs, per
    channel, computed by tensorflow-transform over the train split and compiled into the
    served model: optional percentile clipping, then a method."""

    method: Literal["standard", "minmax", "max", "none"] = Field(
        "standard", description="standard: (x - mean) / std; minmax: (x - min) / (max - min) mapped to `range`; max: x / max; none: as is"
    )
    clip_percentiles: list[float | None] | None = Field(
        None, min_length=2, max_length=2, description="[low, high] percentiles (0..100) of the train pixels to clip to first; null on a side: no clipping there"
    )
    range: list[float] = Field(default_factory=lambda: [0.0, 1.0], min_length=2, max_length=2, description="minmax only: the output range")
    mean: list[float] | None = Field(None, description="standard only: fixed per-channel means instead of the data's (with std)")
    std: list[float] | None = Field(None, description="standard only: fixed per-channel standard deviations (with mean)")

    @model_validator(mode="after")
    def _consistent(self) -> "NormalizationConfig":
        if self.clip_percentiles is not None:
            low, high = self.clip_percentiles
            if all(value is None for value in (low, high)):
                raise ValueError("clip_percentiles: give a low or a high percentile (or leave clip_percentiles out)")
            if any(value is not None and not 0.0 <= value <= 100.0 for value in (low, high)):
                raise ValueError(f"clip_percentiles: percentiles are 0..100, got {self.clip_percentiles}")
            if low is not None and high is not None and low >= high:
                raise ValueError(f"clip_percentiles: low {low} must be below high {high}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together (fixed standardisation)")
        if self.mean is not None and self.method != "standard":
            raise ValueError(f"mean and std are for method standard, not {self.method}")
        if self.std is not None and any(value <= 0 for value in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.range != [0.0, 1.0] and self.method != "minmax":
            raise ValueError(f"range is for method minmax, not {self.method}")
        if self.range[0] >= self.range[1]:
            raise ValueError(f"range: {self.range[0]} must be below {self.range[1]}")
        return self


class HardNegativesConfig(_Strict):
    """Crops centred where the model is wrong (segflow.data.error_maps)."""

    share: float = Field(0.3, gt=0.0, le=1.0, description="share of the training crops centred on a pixel the model got wrong at the last refresh")
    refresh_every: int = Field(5, ge=1, description="epochs between two predictions of the train images (their error maps)")
    keep: int = Field(1024, ge=1, le=65536, description="wrong pixels kept per image and refresh (drawn from a seed)")


class PatchesConfig(_Strict):
    """How the model-size input (`shape`) is cut from an image, the same in training, in
    `serving_default` and in the evaluator. Masks are always resized with nearest neighbours."""

    resize: Literal["resize", "resize_with_pad", "none"] = Field(
        "resize",
        description=(
            "resize: the whole image squeezed to the model size; resize_with_pad: scaled to fit, aspect ratio kept, padded at the bottom "
            "and right (masks with ignore_index, else background); none: full resolution, training on crops of the model size and "
            "serving on blended tiles"
        ),
    )
    interpolation: Literal["bilinear", "area", "bicubic", "lanczos3", "lanczos5", "gaussian", "mitchellcubic", "nearest"] = Field(
        "bilinear", description="how images are resized (tf.image.resize; antialiased except nearest); masks: nearest"
    )
    positive_share: float = Field(
        0.0, ge=0.0, le=1.0, description="resize none: share of training crops centred on a random labelled pixel (a class other than 0); the rest are uniform crops"
    )
    crops_per_image: int = Field(1, ge=1, le=64, description="resize none: crops drawn from each training image per epoch")
    hard_negatives: HardNegativesConfig | None = Field(None, description="resize none: a share of crops centred where the model was last wrong")


class LookaheadConfig(_Strict):
    """Lookahead (Zhang et al. 2019): slow weights that follow the optimizer's fast weights."""

    sync_period: int = Field(6, ge=1, description="optimizer steps between two synchronisations (k)")
    slow_step: float = Field(0.5, gt=0.0, le=1.0, description="share of the way the slow weights move towards the fast ones (alpha)")


class OptimizerConfig(_Strict):
    """The optimizer of a stage (top-level `optimizer`, or a stage's own, which replaces it whole)."""

    name: str = Field("adam", description="a row of `segflow list optimizers`")
    weight_decay: float | None = Field(None, ge=0.0, description="decoupled weight decay; null: the optimizer's own (adamw 0.004, others none)")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="sgd and rmsprop only")
    nesterov: bool = Field(False, description="sgd only: Nesterov momentum")
    clipnorm: float | None = Field(None, gt=0.0, description="clip each gradient to this L2 norm")
    lookahead: LookaheadConfig | None = Field(None, description="wrap the optimizer in Lookahead (radam + lookahead is Ranger)")
    swa_epochs: int = Field(
        0, ge=0, description="stochastic weight averaging: the stage ends with the mean of the weights after each of its last N epochs (0: off)"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _registered(OPTIMIZERS, value)

    @model_validator(mode="after")
    def _parameters(self) -> "OptimizerConfig":
        accepted = OPTIMIZERS.get(self.name).parameters
        given = {"momentum": self.momentum != 0.0, "nesterov": self.nesterov}
        for key in sorted(key for key, set_ in given.items() if set_ and key not in accepted):
            raise ValueError(f"{key} is not a parameter of optimizer {self.name!r} (it takes {', '.join(sorted(accepted)) or 'none of momentum, nesterov'})")
        return self


class PlateauConfig(_Strict):
    """ReduceLROnPlateau on the monitored metric, as a factor on the schedule (a cyclical peak goes down too)."""

    factor: float = Field(0.5, gt=0.0, lt=1.0, description="the schedule's scale is multiplied by this")
    patience: int = Field(3, ge=1, description="epochs without improvement before a reduction")
    min_delta: float = Field(0.0, ge=0.0, description="smaller changes of the metric are no improvement")
    cooldown: int = Field(0, ge=0, description="epochs after a reduction during which no other happens")
    min_scale: float = Field(1e-3, gt=0.0, le=1.0, description="the scale never goes below this")


class ScheduleConfig(_Strict):
    """How the learning rate moves within a stage; lengths are in epochs (fractions allowed)."""

    name: str = Field("constant", description="a row of `segflow list schedules`")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warmup from 0 to the schedule's start, before it")
    min_learning_rate: float = Field(0.0, ge=0.0, description="polynomial and cosine end there; cyclical's low end")
    decay_rate: float = Field(0.5, gt=0.0, le=1.0, description="exponential: factor per decay_epochs")
    decay_epochs: float = Field(1.0, gt=0.0, description="exponential: epochs per decay_rate factor")
    power: float = Field(1.0, gt=0.0, description="polynomial: exponent (1 is linear)")
    cycle_epochs: float = Field(4.0, gt=0.0, description="cyclical: epochs of one low-high-low cycle")
    mode: Literal["triangular", "triangular2", "exp_range"] = Field(
        "triangular", description="cyclical: constant amplitude, halved every cycle, or times gamma per epoch"
    )
    gamma: float = Field(0.9, gt=0.0, le=1.0, description="cyclical exp_range: amplitude factor per epoch")
    reduce_on_plateau: PlateauConfig | None = Field(None, description="lower the schedule when the monitored metric stalls")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _registered(SCHEDULES, value)


class EarlyStoppingConfig(_Strict):
    patience: int = Field(5, ge=1, description="epochs without improvement of the monitored metric before the stage stops")
    min_delta: float = Field(0.0, ge=0.0, description="smaller changes are no improvement")


class CallbacksConfig(_Strict):
    """What watches a stage's epochs; `monitor` is the metric that decides (a val_ key of history.csv)."""

    monitor: str = Field("val_mean_iou", pattern=r"^val_", description="the primary metric: maximised, or minimised when its name ends in loss")
    early_stopping: EarlyStoppingConfig | None = Field(None, description="stop the stage when the monitored metric stalls")
    keep_best: int = Field(0, ge=0, description="keep the N best checkpoints of the stage by the monitored metric in model_run/checkpoints/")
    restore: Literal["best", "last"] = Field("last", description="weights the stage ends with: its best checkpoint (needs keep_best >= 1) or its last epoch")
    predictions_every: int = Field(0, ge=0, description="every N epochs a PNG of predictions on a few eval images in model_run/predictions/ (0: off)")
    prediction_images: int = Field(4, ge=1, le=64, description="eval images in each predictions PNG")

    @model_validator(mode="after")
    def _restore(self) -> "CallbacksConfig":
        if self.restore == "best" and self.keep_best < 1:
            raise ValueError("restore: best needs keep_best >= 1 (the best checkpoint is the file it loads)")
        return self

    @property
    def monitor_mode(self) -> Literal["min", "max"]:
        return "min" if self.monitor.endswith("loss") else "max"


class StageConfig(_Strict):
    """One training stage; several stages continue from each other's weights. A key left
    null takes the top-level value (optimizer, schedule, callbacks, loss, model.freeze_encoder)."""

    epochs: int = Field(10, ge=1, description="training epochs of the stage (early_stopping may end it sooner)")
    learning_rate: float = Field(1e-3, gt=0.0, description="the stage's rate: the schedule's peak")
    freeze_encoder: bool | None = Field(None, description="this stage's encoder freezing; null: model.freeze_encoder")
    optimizer: OptimizerConfig | None = None
    schedule: ScheduleConfig | None = None
    callbacks: CallbacksConfig | None = None
    loss: str | None = Field(None, description="a loss expression for this stage; null: the top-level loss")
    negatives: Literal["none", "real"] | int | None = Field(
        None,
        description=(
            "patches.resize none: this stage's crops: none = centred on labelled pixels only, real = uniform (the data's own ratio), "
            "k = k crops centred on background per labelled-centred one; null: patches.positive_share"
        ),
    )
    initial_weights: str | None = Field(
        None, min_length=1, description="a .weights.h5 file (of the same network) loaded before the stage, e.g. another run's backup/stage-1.weights.h5, "
        "or current: the network of the registry's current version (a warm start; none yet: from scratch; another network: an error)"
    )

    @field_validator("loss")
    @classmethod
    def _loss(cls, value: str | None) -> str | None:
        if value is not None:
            parse_loss(value)
        return value


class ModelConfig(_Strict):
    depth: int | None = Field(
        None, ge=1, le=6, description="encoder levels (down-samplings; total stride 2**depth); null: the backbone's own (simple: 4, others: 5)"
    )
    base_filters: int = Field(32, ge=4, le=256, description="filters of the first level; doubled per level")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="dropout rate at one place of the decoder (unet, linknet: the coarsest features; fpn: the summed heads; pspnet: after "
        "pyramid pooling; deeplabv3plus: after ASPP), against overfitting; 0: off",
    )
    encoder_weights: str | None = Field(
        None, min_length=1, description="imagenet (from the Keras cache, never downloaded), a weights file, or null: random initialisation"
    )
    freeze_encoder: bool = Field(False, description="train the decoder only (BatchNorm of the encoder in inference mode); stages may override")
    pixel_shuffle: Literal[1, 2, 4] = Field(
        1,
        description="run the network on f x f pixel blocks (space-to-depth in, depth-to-space out): no pixel lost, "
        "f**2 less full-resolution work; what makes int8 exports pay off on mobile CPUs (random initialisation only)",
    )


class BeamConfig(_Strict):
    """DirectRunner settings for the data components. Threads are the default: decoding,
    PNG encoding and GZIP release the GIL, and benchmarks/example_gen_modes.py measured
    threads faster than processes (whose workers take seconds to start) on 2 cores."""

    running_mode: Literal["multi_processing", "multi_threading", "in_memory"] = Field(
        "multi_threading",
        description="DirectRunner only: multi_threading (num_workers threads), multi_processing (num_workers processes, each seconds "
        "to start) or in_memory (one worker)",
    )
    num_workers: int = Field(0, ge=0, description="0 means one worker per available core")
    runner: Literal["DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner"] = Field(
        "DirectRunner", description="DirectRunner runs inside the step's process (pod); the others submit the step's Beam job to that service"
    )
    options: dict[str, str | int | float | bool | list[str]] = Field(
        default_factory=dict, description="Beam pipeline options (flag names without --), e.g. {project: p, region: europe-west1}"
    )

    @model_validator(mode="after")
    def _beam_options(self) -> "BeamConfig":
        if self.runner != "DirectRunner" or self.options:
            from segflow.utils.beam_runners import check_options

            check_options(self.runner, self.options)  # ValueError naming each bad option
        return self


class ValidationConfig(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    on_anomaly: Literal["warn", "fail"] = Field(
        "warn", description="what a data anomaly of the ExampleValidator does: warn records and prints it, fail stops the run before training"
    )
    max_class_shift: float = Field(0.15, gt=0.0, le=1.0, description="L-infinity distance of class frequencies")
    # `schema` in YAML; named schema_path here because pydantic models own a `schema` attribute.
    schema_path: str | None = Field(None, alias="schema", description="schema.pbtxt (or a SchemaGen output folder) of an earlier run to validate against")
    baseline_statistics: str | None = Field(
        None, description="statistics.json (or a StatisticsGen output folder) of an earlier run, for drift checks, or current: "
        "those the registry's current version was trained on (none yet: no drift check)"
    )
    on_drift: Literal["warn", "fail"] | None = Field(
        None, description="what a drift anomaly against baseline_statistics does (CLASS_DRIFT, IMAGE_SIZE_CHANGED, BIT_DEPTH_CHANGED, "
        "DYNAMIC_RANGE_CHANGED): warn, or fail: stop the run before training; null: as on_anomaly"
    )


class SlicingSpec(_Strict):
    """TFMA's SlicingSpec (tfma.SlicingSpec): `{}` is the whole split, `feature_keys: [a]` one slice
    per value of a, `feature_values: {a: v}` only the examples whose a is v. Features: the
    evaluator's derived `source`, `image_size`, `object_size`, `mask_empty`, and every scalar
    feature the examples carry (`channels`, `bit_depth`, any metadata column)."""

    feature_keys: list[str] = Field(default_factory=list, description="slice by every value of these features (crossed when several)")
    feature_values: dict[str, str] = Field(default_factory=dict, description="keep only examples with these feature values")


class ChangeThresholds(_Strict):
    """Blessing thresholds against the baseline (the registry's `current` version, the one that serves), on the eval split."""

    max_mean_iou_drop: float | None = Field(
        None, ge=0.0, le=1.0, description="not blessed when eval mean IoU is more than this below the baseline's (null: no change threshold)"
    )


class EvaluationConfig(_Strict):
    min_mean_iou: float = Field(0.0, ge=0.0, le=1.0, description="blessing threshold on eval mean IoU")
    min_class_iou: float | dict[str, float] | None = Field(
        None, description="blessing thresholds on eval per-class IoU: one for every class, or class name -> threshold (null: none)"
    )
    change_thresholds: ChangeThresholds = Field(default_factory=ChangeThresholds, description="blessing thresholds against the baseline")
    slicing_specs: list[SlicingSpec] | None = Field(
        None, description="TFMA slicing specs; null: overall, source (with dataset.group_by), image_size, object_size, mask_empty and each example metadata column"
    )
    boundary_tolerance: int = Field(2, ge=0, le=64, description="boundary F1: a boundary pixel matches one of the other mask within this many pixels")
    image_size_buckets: list[int] = Field(
        default_factory=lambda: [256, 512, 1024], min_length=1, description="image_size slice: edges on the longer side in pixels (ascending)"
    )
    object_size_buckets: list[float] = Field(
        default_factory=lambda: [0.01, 0.1], min_length=1, description="object_size slice: edges on the non-background share of labelled pixels (ascending)"
    )
    threshold_steps: int = Field(20, ge=2, le=1000, description="binary tasks: foreground thresholds k/steps (k = 1..steps-1) swept for the best mean IoU")
    tta: Literal["none", "hflip", "flips", "d4"] = Field(
        "none",
        description=(
            "test-time augmentation: average the probabilities over views of each image, each mapped back: hflip = the image and its "
            "horizontal flip (2 views), flips = and vertical flips (4), d4 = every rotation by 90 degrees with and without a flip (8)"
        ),
    )
    flip_tta: bool = Field(False, description="older spelling of tta: hflip")
    batch: int = Field(
        8, ge=1, le=1024, description="examples per model call (same-size images are stacked; their probabilities take batch x H x W x classes x 4 bytes)"
    )

    @model_validator(mode="after")
    def _flip_tta_agrees(self) -> "EvaluationConfig":
        if self.flip_tta and self.tta not in ("none", "hflip"):
            raise ValueError(f"flip_tta: true (tta: hflip) contradicts tta: {self.tta}; drop flip_tta")
        return self

    @property
    def test_time_views(self) -> Literal["none", "hflip", "flips", "d4"]:
        """The `tta` in effect: flip_tta is the older spelling of hflip."""
        return "hflip" if self.flip_tta else self.tta

    @field_validator("min_class_iou")
    @classmethod
    def _unit_interval(cls, value: float | dict[str, float] | None) -> float | dict[str, float] | None:
        numbers = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if any(not 0.0 <= number <= 1.0 for number in numbers):
            raise ValueError("per-class IoU thresholds must be between 0 and 1")
        return value

    @field_validator("image_size_buckets", "object_size_buckets")
    @classmethod
    def _ascending(cls, value: list[Any]) -> list[Any]:
        if any(low >= high for low, high in zip(value, value[1:])) or value[0] <= 0:
            raise ValueError("bucket edges must be positive and strictly ascending")
        return value


class PushConfig(_Strict):
    registry: str = Field(
        "model-registry",
        description="where a blessed model is pushed, as <registry>/<name>/<version>/ (a path or a gs:// / s3:// URI); its `current` version is "
        "the evaluator's baseline; on Kubeflow the pipeline parameter registry overrides it",
    )


class ExportConfig(_Strict):
    """What the Exporter builds and the parity gate each export must pass to be pushed.
    `export: [a, b]` (a plain list) is short for `export: {formats: [a, b]}`."""

    formats: list[str] = Field(default_factory=lambda: ["saved_model", "tflite_fp32", "tflite_int8"], description="rows of `segflow list exports`")
    max_drop: float = Field(
        0.02, ge=0.0, le=1.0, description="an export whose eval mean IoU is more than this below the float served model's fails and is not pushed"
    )
    onnx_opset: int = Field(17, ge=13, le=18, description="ONNX opset of the onnx and TensorRT exports (tf2onnx 1.17 writes 13..18)")
    calibration_examples: int = Field(64, ge=1, le=10000, description="train examples that calibrate int8 and int16x8 quantization")
    quantizer: Literal["converter", "ai_edge_quantizer"] = Field(
        "converter",
        description=(
            "who quantizes tflite_dynamic and tflite_int8 (the other TFLite rows always use the TFLite converter): converter, or "
            "ai_edge_quantizer (LiteRT's ai-edge-quantizer, recipes dynamic_wi8_afp32 and static_wi8_ai8, with a per-layer error report "
            "<file>.quantizer_report.json); the converter is the default because ai-edge-quantizer was no faster and no more accurate "
            "on the ISBI U-Net (benchmarks/README.md, ai-edge-quantizer section)"
        ),
    )

    @field_validator("formats")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        for name in value:
            _registered(EXPORT_FORMATS, name)
        if len(set(value)) != len(value):
            raise ValueError("export formats must be unique")
        return value


class QatConfig(_Strict):
    """Quantization-aware training (tensorflow-model-optimization) after the stages: a
    fake-quantized copy of the trained network is fine-tuned and served beside the float
    model; the `tflite_int8_qat` export converts it to full integer."""

    epochs: int = Field(2, ge=1, description="fine-tuning epochs on the train split (augmented as in training)")
    learning_rate: float = Field(1e-4, gt=0.0, description="Adam's learning rate for the fine-tuning; lower than training's")


class TrainerConfig(_Strict):
    """How training is distributed. `workers` > 1 turns the trainer step into a launcher of
    that many worker processes (local) or pods (Kubernetes Indexed Job or Kubeflow TFJob)."""

    distribution: Literal["auto", "one_device", "mirrored", "multi_worker"] = Field(
        "auto", description="auto: MirroredStrategy over visible GPUs, MultiWorkerMirroredStrategy when TF_CONFIG names several workers, else one device"
    )
    workers: int = Field(1, ge=1, le=64, description="worker processes/pods for MultiWorkerMirroredStrategy")
    launcher: Literal["auto", "local", "indexed_job", "tfjob"] = Field(
        "auto", description="auto: local processes outside Kubernetes, an Indexed Job inside a pod; tfjob needs the Kubeflow training operator"
    )
    scale_learning_rate: bool = Field(False, description="multiply each stage's learning rate by the number of replicas")
    timeout_seconds: int = Field(24 * 3600, ge=60, description="a launcher gives up on its workers after this long")
    mixed_precision: Literal["mixed_float16", "mixed_bfloat16"] | None = Field(
        None, description="Keras mixed-precision policy (float16/bfloat16 compute, float32 weights and logits); pays on GPUs and TPUs, not on CPUs"
    )
    jit_compile: bool = Field(False, description="compile the train step with XLA (model.compile jit_compile)")


class Toleration(_Strict):
    key: str = Field(description="the key of the node taint tolerated, e.g. nvidia.com/gpu")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal: the taint's value must be `value`; Exists: any value of the key")
    value: str | None = Field(None, description="the taint's value, for operator Equal")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="the taint effect tolerated; null: every effect"
    )


class NodePool(_Strict):
    """Where a step's pods are scheduled."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="node labels the pods' nodes must have (Kubernetes nodeSelector), e.g. {cloud.google.com/gke-accelerator: nvidia-tesla-t4}"
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="node taints the pods tolerate (Kubernetes tolerations), e.g. a GPU pool's nvidia.com/gpu taint"
    )
    accelerator_type: str | None = Field(
        None, description="the accelerator resource requested, e.g. nvidia.com/gpu (default when accelerator_count > 0); pick the GPU model with node_selector"
    )
    accelerator_count: int = Field(
        0,
        ge=0,
        description="accelerators (accelerator_type) each pod gets as a limit; in trainer_pool, more than 0 also runs the trainer in "
        "gpu_image (when set); 0: none",
    )

    @model_validator(mode="after")
    def _accelerators(self) -> "NodePool":
        if self.accelerator_type is not None and self.accelerator_count == 0:
            raise ValueError(f"accelerator_type {self.accelerator_type!r} needs accelerator_count >= 1")
        return self


class Resources(_Strict):
    """Kubernetes requests and limits (quantities as Kubernetes writes them: '2', '500m', '8Gi')."""

    cpu: str | None = Field(None, description="CPU request, e.g. '500m' or '4'; null: the default entry's, else none")
    memory: str | None = Field(None, description="memory request, e.g. '2Gi'; null: the default entry's, else none")
    cpu_limit: str | None = Field(None, description="CPU limit; null: the default entry's, else none")
    memory_limit: str | None = Field(None, description="memory limit, e.g. '32Gi'; null: the default entry's, else none")


class SecretEnv(_Strict):
    """An environment variable of every step, taken from a Kubernetes Secret (never a literal)."""

    secret: str = Field(description="name of the Kubernetes Secret")
    key: str = Field(description="the key in the Secret whose value the variable gets")
    env: str = Field(description="name of the environment variable")


class KubernetesConfig(_Strict):
    """Settings that matter only on a cluster (compiled into the pipeline; kfp.local ignores them)."""

    image: str = Field("ghcr.io/segflow/segflow:0.1.0", description="registry/name:tag of the segflow image every step runs in")
    gpu_image: str | None = Field(None, description="image of the trainer when it has accelerators (the GPU build); default: image")
    namespace: str = Field(
        "segflow", description="namespace in which the multi-worker launcher (trainer.workers > 1) creates its Job or TFJob, pods and Service"
    )
    service_account: str = Field(
        "segflow-launcher",
        description="service account of the runs segflow submit and schedule create (--service-account overrides it; '': KFP's default); "
        "k8s/ gives segflow-launcher the Role the multi-worker launcher needs",
    )
    pipeline_root: str | None = Field(None, description="gs://, s3:// or minio:// URI, or a PVC path, for KFP artifacts")
    pvc: str | None = Field(None, description="a PersistentVolumeClaim mounted at pvc_mount_path in every step")
    pvc_mount_path: str = Field("/mnt/segflow", pattern=r"^/", description="where the PVC is mounted (an absolute path)")
    trainer_pool: NodePool = Field(default_factory=NodePool, description="where the trainer step runs (the GPU node pool)")
    data_pool: NodePool = Field(default_factory=NodePool, description="where every other step runs (a CPU node pool)")
    resources: dict[str, Resources] = Field(default_factory=dict, description="per component name, or 'default'")
    retries: int = Field(
        0, ge=0, le=10, description="times a failed step is retried (also the backoffLimit of the multi-worker Job or TFJob); 0: none"
    )
    caching: bool = Field(
        True, description="KFP's cache: a step whose inputs did not change is not re-run (dataset_fingerprint, the evaluator and the pusher are never cached)"
    )
    secrets: list[SecretEnv] = Field(default_factory=list)


class TrackingConfig(_Strict):
    """Where a finished local run is also logged, besides its tracking.json (segflow.evaluate.tracking)."""

    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI to log the run to (file:///path, http://host:5000; sqlite:/// needs the full mlflow package); null: no MLflow (needs segflow[mlflow])"
    )
    experiment: str | None = Field(None, description="MLflow experiment name; null: the config's name")


# Sections that may be written as the value of their main key (of that value's type): `export: [a, b]`
# is short for `export: {formats: [a, b]}`. The config's validator and its JSON Schema both read this table.
SHORTHANDS: dict[str, tuple[str, type]] = {"export": ("formats", list), "normalization": ("method", str)}


class ExperimentConfig(_Strict):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the experiment's name (letters, digits, _ . -): names the run folder runs/<name>-<timestamp>, the model in push.registry, "
        "the Kubeflow pipeline and experiment, and the MLflow experiment",
    )
    dataset: DatasetConfig
    classes: int | list[str] = Field(
        2,
        description="class names in label-id order, or their count (named by their ids); 1 (or one name): a binary mask, trained as "
        "foreground with one sigmoid channel, background added",
    )
    ignore_index: int | None = Field(None, ge=0, le=255, description="label value skipped by losses and metrics")
    mask_values: list[int] | None = Field(
        None,
        description="raw mask values of the class labels in id order, e.g. [0, 255]; null: masks hold the class ids; a mask with another "
        "value (not ignore_index) is quarantined",
    )
    shape: list[int] = Field(
        default_factory=lambda: [256, 256, 3],
        min_length=3,
        max_length=3,
        description="model input [height, width, channels]: height and width at least 16 and multiples of the network's total stride; "
        "channels 1 or 3 (images are converted: grey repeated to 3, colour to luma for 1, alpha dropped)",
    )
    architecture: str = Field("unet", description="the decoder: a row of `segflow list architectures`")
    backbone: str = Field("simple", description="the encoder: a row of `segflow list backbones`")
    model: ModelConfig = Field(
        ModelConfig(), description="the network: encoder depth, filters, dropout, pretrained encoder weights, encoder freezing, pixel shuffle"
    )
    normalization: NormalizationConfig = Field(
        default_factory=NormalizationConfig, description="a method name (standard, minmax, max, none) or the whole section"
    )
    patches: PatchesConfig = Field(default_factory=PatchesConfig, description="whole images resized to the model size, or crops at full resolution")
    augmentation: dict[str, Any] | list[Any] = Field(
        default_factory=dict,
        description="{Name: {parameters}} applied in order, or a list of one-key mappings with Compose/OneOf/SomeOf groups (segflow.data.augment)",
    )
    loss: str = Field(
        "crossentropy",
        description="the training loss: a weighted sum of registered losses with optional parameters, e.g. crossentropy+0.5*dice "
        "(`segflow list losses`)",
    )
    class_weights: Literal["auto"] | list[float] | None = Field(
        None, description="per-class loss weights by label id, or auto: median-frequency weights from the train split"
    )
    batch: int = Field(
        8, ge=1, description="training examples per step and replica (global batch: batch x replicas); halved when a stage runs out of memory"
    )
    stages: list[StageConfig] = Field(default_factory=lambda: [StageConfig()], min_length=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="every stage's optimizer unless the stage has its own")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="every stage's learning-rate schedule unless the stage has its own")
    callbacks: CallbacksConfig = Field(default_factory=CallbacksConfig, description="every stage's callbacks unless the stage has its own")
    export: ExportConfig = ExportConfig()
    qat: QatConfig | None = Field(None, description="quantization-aware training after the stages; needed by the tflite_int8_qat export")
    seed: int = Field(
        0, description="random seed of training: weight initialisation, shuffling, augmentation and crop draws (the splits come from file-name hashes)"
    )
    deterministic: bool = Field(False, description="TensorFlow op determinism: identical runs give identical metrics (slower)")
    beam: BeamConfig = BeamConfig()
    validation: ValidationConfig = Field(
        ValidationConfig(), description="the ExampleValidator's data checks (class balance, an earlier run's schema or statistics) and what an anomaly does"
    )
    evaluation: EvaluationConfig = Field(
        EvaluationConfig(),
        description="the Evaluator: metrics, slices, test-time augmentation and the thresholds that bless a model (only a blessed model "
        "is exported and pushed)",
    )
    push: PushConfig = Field(PushConfig(), description="where the Pusher publishes a blessed model")
    trainer: TrainerConfig = TrainerConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow logging of a finished local run")

    @field_validator(*SHORTHANDS, mode="before")
    @classmethod
    def _shorthand(cls, value: Any, info: ValidationInfo) -> Any:
        """`normalization: minmax` is short for `normalization: {method: minmax}` (SHORTHANDS)."""
        key, short_type = SHORTHANDS[info.field_name]
        return {key: value} if isinstance(value, short_type) else value

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: int | list[str]) -> int | list[str]:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1")
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("class names must be non-empty and unique")
        return value

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: list[int]) -> list[int]:
        height, width, channels = value
        if channels not in (1, 3):
            raise ValueError("channels (third value) must be 1 or 3")
        if height < 16 or width < 16:
            raise ValueError("height and width must be at least 16")
        return value

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, value: str) -> str:
        return _registered(ARCHITECTURES, value)

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, value: str) -> str:
        return _registered(BACKBONES, value)

    @field_validator("augmentation")
    @classmethod
    def _augmentation(cls, value: dict[str, Any] | list[Any], info: ValidationInfo) -> dict[str, Any] | list[Any]:
        from segflow.data.augment import build_policy

        # Names and parameters are checked now, not at the first training batch; ignore_index
        # (validated before this field) is what geometric transforms write into new mask pixels.
        build_policy(value, ignore_index=info.data.get("ignore_index"))
        shape = info.data.get("shape")
        if shape and shape[0] != shape[1]:
            from segflow.data.augment import SQUARE_ONLY, entry_names

            for key, name in entry_names(value).items():
                if name in SQUARE_ONLY:
                    raise ValueError(f"{key}: {name} swaps height and width, so it needs a square shape (shape is {shape[0]}x{shape[1]})")
        return value

    @field_validator("loss")
    @classmethod
    def _loss(cls, value: str) -> str:
        parse_loss(value)
        return value

    @model_validator(mode="after")
    def _network(self) -> "ExperimentConfig":
        from segflow.model.models import check_spec, model_spec

        spec = model_spec(self.shape, 1 if self.sigmoid_head else self.num_labels, self.backbone, self.model)
        check_spec(self.architecture, spec)  # shape vs stride, channels vs weights
        return self

    @model_validator(mode="after")
    def _qat(self) -> "ExperimentConfig":
        if "tflite_int8_qat" in self.export.formats and self.qat is None:
            raise ValueError("export tflite_int8_qat converts the quantization-aware model the trainer fine-tunes: add `qat: {epochs: 2}`")
        if self.qat is not None:
            from segflow.model.models import builtin_backbones

            if self.backbone not in builtin_backbones():
                raise ValueError(
                    f"qat: tensorflow-model-optimization cannot quantize backbone {self.backbone} (a tf_keras.applications model "
                    f"nested in the network); use a built-in backbone ({', '.join(builtin_backbones())}) or drop qat"
                )
        return self

    @model_validator(mode="after")
    def _normalization_channels(self) -> "ExperimentConfig":
        for key in ("mean", "std"):
            values = getattr(self.normalization, key)
            if values is not None and len(values) != self.shape[2]:
                raise ValueError(f"normalization.{key}: {len(values)} values for {self.shape[2]} channel(s) (shape {self.shape})")
        return self

    @model_validator(mode="after")
    def _crops(self) -> "ExperimentConfig":
        patches = self.patches
        chooses_crops = patches.positive_share or patches.crops_per_image > 1 or patches.hard_negatives or any(stage.negatives is not None for stage in self.stages)
        if chooses_crops and patches.resize != "none":
            raise ValueError(
                f"patches.positive_share, crops_per_image, hard_negatives and a stage's negatives choose crops; they need patches.resize none, not {patches.resize}"
            )
        return self

    @model_validator(mode="after")
    def _labels(self) -> "ExperimentConfig":
        if self.mask_values is not None:
            if len(self.mask_values) != self.num_labels:
                raise ValueError(
                    f"mask_values has {len(self.mask_values)} values but there are {self.num_labels} class labels "
                    f"({', '.join(self.class_names)})"
                )
            if len(set(self.mask_values)) != len(self.mask_values):
                raise ValueError("mask_values must be unique")
        if isinstance(self.class_weights, list):
            if len(self.class_weights) != self.num_labels:
                raise ValueError(
                    f"class_weights has {len(self.class_weights)} values but there are {self.num_labels} class labels "
                    f"({', '.join(self.class_names)}); give one weight per label id, or auto"
                )
            if min(self.class_weights) < 0 or max(self.class_weights) <= 0:
                raise ValueError("class_weights must be non-negative with at least one positive weight")
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_labels:
            raise ValueError(f"ignore_index {self.ignore_index} collides with a class id (0..{self.num_labels - 1})")
        if self.ignore_index is not None and self.mask_values is not None and self.ignore_index in self.mask_values:
            position = self.mask_values.index(self.ignore_index)
            raise ValueError(
                f"ignore_index {self.ignore_index} is also in mask_values {self.mask_values}: mask_values says raw value "
                f"{self.ignore_index} is class {position} ({self.class_names[position]!r}), ignore_index says pixels of that "
                "value carry no label and are skipped by losses and metrics. Remove it from one of the two "
                "(e.g. drop ignore_index when the mask has no void value)"
            )
        return self

    @model_validator(mode="after")
    def _stages(self) -> "ExperimentConfig":
        for number, stage in enumerate(self.stages):
            optimizer, schedule = stage.optimizer or self.optimizer, stage.schedule or self.schedule
            if optimizer.swa_epochs > stage.epochs:
                raise ValueError(f"stages.{number}: swa_epochs {optimizer.swa_epochs} is more than the stage's {stage.epochs} epochs")
            if optimizer.swa_epochs and (stage.callbacks or self.callbacks).restore == "best":
                raise ValueError(f"stages.{number}: swa_epochs and restore: best both choose the weights the stage ends with; keep one")
            if schedule.name != "constant" and schedule.min_learning_rate >= stage.learning_rate:
                raise ValueError(
                    f"stages.{number}: schedule {schedule.name!r} needs min_learning_rate ({schedule.min_learning_rate:g}) "
                    f"below the stage's learning_rate ({stage.learning_rate:g})"
                )
        return self

    @property
    def validation_choices(self) -> list[str]:
        """What reads the eval split while training (checkpoint choice, early stop, plateau
        drops). In a k-fold run that split is the scored fold, so each makes its figures optimistic."""
        choices = []
        for number, stage in enumerate(self.stages):
            callbacks, schedule = stage.callbacks or self.callbacks, stage.schedule or self.schedule
            if callbacks.restore == "best":
                choices.append(f"stages.{number}: restore: best")
            if callbacks.early_stopping is not None:
                choices.append(f"stages.{number}: early_stopping")
            if schedule.reduce_on_plateau is not None:
                choices.append(f"stages.{number}: reduce_on_plateau")
        return choices

    @property
    def class_names(self) -> list[str]:
        """Label names by id; `classes: 1` means a binary foreground mask plus background."""
        if isinstance(self.classes, list):
            return ["background", self.classes[0]] if len(self.classes) == 1 else list(self.classes)
        if self.classes == 1:
            return ["background", "foreground"]
        return [str(index) for index in range(self.classes)]

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    @property
    def sigmoid_head(self) -> bool:
        """One declared class trains a single sigmoid channel instead of a softmax."""
        count = len(self.classes) if isinstance(self.classes, list) else self.classes
        return count == 1

    @property
    def total_epochs(self) -> int:
        return sum(stage.epochs for stage in self.stages)

    def config_hash(self) -> str:
        """sha256 of the resolved config: equal hashes mean the same experiment settings."""
        import hashlib
        import json

        canonical = json.dumps(json.loads(self.to_json()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def from_json(cls, text: str) -> "ExperimentConfig":
        return cls.model_validate_json(text)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def _registered(registry: Any, name: str) -> str:
    if name not in registry:
        raise ValueError(f"unknown {registry.kind} {name!r}; registered: {', '.join(registry.names())}")
    return name


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` to a raw config dict; the value is parsed as YAML (`5`, `[1, 2]`, `true`)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    path, _, text = assignment.partition("=")
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {assignment!r}: empty key in {path!r}")
    node = raw
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
            continue
        child = node.get(key) if isinstance(node, dict) else None
        if child is None:
            child = {}
            node[key] = child
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(keys[: depth + 1])} is not a mapping")
        node = child
    value = yaml.safe_load(text) if text.strip() else ""
    last = keys[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ConfigError(f"--set {assignment!r}: {last!r} is not an index of {'.'.join(keys[:-1])}")
        node[int(last)] = value
    else:
        node[last] = value


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)


def validate_config(raw: Any, source: str = "config") -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source} is not a valid segflow config:\n{_format_errors(error)}") from None


def load_config(path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read, override and validate a YAML experiment file."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    raw = {} if raw is None else raw
    for assignment in overrides:
        if not isinstance(raw, dict):
            break
        apply_override(raw, assignment)
    return validate_config(raw, str(path))


def config_schema() -> dict[str, Any]:
    """The JSON Schema of an experiment YAML (`segflow schema`), for editors' completion and inline
    errors. It checks structure, types, ranges and names of keys; the cross-key rules (a loss
    expression, an augmentation's parameters, a backbone that fits the architecture) are the
    validator's, so `segflow validate` remains the full check."""
    schema = ExperimentConfig.model_json_schema()
    definitions = schema["$defs"]
    for section, (key, _) in SHORTHANDS.items():
        full = schema["properties"][section]
        reference = full.get("$ref") or next(option["$ref"] for option in full.get("anyOf", full.get("allOf", [])) if "$ref" in option)
        short = definitions[reference.rsplit("/", 1)[-1]]["properties"][key]
        schema["properties"][section] = {"anyOf": [{"$ref": reference}, short], "description": full.get("description", f"{section} section, or its {key} alone")}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "segflow experiment config", **schema}
