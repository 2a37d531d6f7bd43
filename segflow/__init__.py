"""segflow: image-segmentation training pipeline (TFX-style components on KFP and Beam)."""
import os

# The trainer needs Keras 2 (tf_keras); this must be set before TensorFlow is imported anywhere.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
