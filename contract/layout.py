"""Names in the model repository: `<repository>/<model>/<version>/model.onnx` and friends."""

from __future__ import annotations

import re

MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""A model directory's name: letters, digits, '_', '.' and '-', not starting with '.' or '-'."""

VERSION_NAME = re.compile(r"[0-9]{1,18}")
"""A version directory's name: ASCII digits ("²".isdigit() is true too); the number must be > 0."""

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.json"
REPORT_DIR = "report"
TMP_PREFIX = ".tmp-"
"""An export in progress: `<model>/.tmp-<random>/`, renamed to `<model>/<N>/` when complete."""

VERSION_FILES = (MODEL_FILE, METADATA_FILE, LABELS_FILE)
"""The files of a version directory the server reads."""

CONTRACT_FORMAT = "1"
SUPPORTED_FORMATS = (CONTRACT_FORMAT,)
INPUT_NAME = "images"
OUTPUT_NAME = "logits"

# The metadata_props keys (every value a string; JSON where noted in the docs).
KEY_PREFIX = "convserve."
FORMAT_KEY = "convserve.format"
LABELS_KEY = "convserve.labels"
PREPROCESSING_KEY = "convserve.preprocessing"
MODEL_CONFIG_KEY = "convserve.model_config"
TRAINING_KEY = "convserve.training"
DATASET_KEY = "convserve.dataset"
TEST_ACCURACY_KEY = "convserve.test_accuracy"
CREATED_KEY = "convserve.created"
QUANTIZATION_KEY = "convserve.quantization"


def is_model_name(name: str) -> bool:
    return MODEL_NAME.fullmatch(name) is not None


def version_number(name: str) -> int | None:
    """The version a directory name stands for, or None when it is no version name."""
    if VERSION_NAME.fullmatch(name) is None or int(name) < 1:
        return None
    return int(name)
