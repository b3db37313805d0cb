"""A published FP32 version -> an INT8 version, through the same staging and publish as an export.

Order: the source version is found and checked against the contract -> calibration images (the
model's training split, or random pixels for an untrained model) -> ONNX Runtime pre-processing
and static quantization (QDQ) into a staging directory -> the contract's structure checks ->
FP32 and INT8 test accuracy through ONNX Runtime, refused when INT8 loses more than the allowed
drop -> metadata (the source's, plus ``convserve.quantization``), labels.txt, metadata.json and
report/quantization.md -> one rename to the next version. Any failure publishes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime import quantization as ortq

from contract.layout import (
    CONTRACT_FORMAT,
    DATASET_KEY,
    FORMAT_KEY,
    INPUT_NAME,
    LABELS_KEY,
    MODEL_CONFIG_KEY,
    MODEL_FILE,
    PREPROCESSING_KEY,
    QUANTIZATION_KEY,
    REPORT_DIR,
    TEST_ACCURACY_KEY,
    TRAINING_KEY,
)
from training.data import DataConfig, Dataset, load_data
from training.errors import ConfigError, ExportError, RepositoryError
from training.export import (
    check_structure,
    contract_metadata,
    embed_metadata,
    write_version_files,
)
from training.onnx_eval import Evaluation, evaluate_onnx, onnx_logits, onnx_session
from training.quantize import CALIBRATION_SOURCES, QuantizeConfig
from training.quantize_report import REPORT_FILE, write_quantization_report
from training.repository import check_model_name, publish, staging_directory, versions

logger = logging.getLogger(__name__)

REQUIRED_KEYS = (FORMAT_KEY, LABELS_KEY, PREPROCESSING_KEY)
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"})
METHODS = {
    "minmax": ortq.CalibrationMethod.MinMax,
    "entropy": ortq.CalibrationMethod.Entropy,
    "percentile": ortq.CalibrationMethod.Percentile,
}
CALIBRATION_BATCH = 64
RANDOM_EVALUATION_IMAGES = 256
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class SourceVersion:
    """The published FP32 version being quantized, its metadata checked against the contract."""

    repository: Path
    model: str
    version: int
    path: Path
    metadata: dict[str, str]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        p = json.loads(self.metadata[PREPROCESSING_KEY])
        return int(p["channels"]), int(p["height"]), int(p["width"])

    @property
    def labels(self) -> list[str]:
        return [str(label) for label in json.loads(self.metadata[LABELS_KEY])]


@dataclass(frozen=True)
class QuantizedVersion:
    """Where the INT8 version went and what it scored beside its source."""

    model: str
    version: int
    path: Path
    source_model: str
    source_version: int
    record: dict[str, Any]

    @property
    def report(self) -> Path:
        return self.path / REPORT_DIR / REPORT_FILE

    def accuracy_lines(self) -> list[str]:
        fp32, int8 = self.record["fp32_test_accuracy"], self.record["int8_test_accuracy"]
        agreement = f"top-1 agreement with FP32: {self.record['top1_agreement']:.4f}"
        if fp32 is None or int8 is None:
            return [
                "test accuracy: not measured (calibrated on random pixels: no test split)",
                f"{agreement} on {self.record['evaluation_images']} random images",
            ]
        return [
            f"test accuracy (ONNX Runtime, {self.record['evaluation_images']} images): "
            f"FP32 {fp32:.4f}, INT8 {int8:.4f} (INT8 - FP32: {100 * (int8 - fp32):+.2f} points)",
            agreement,
        ]


def find_source(repository: Path, model: str, version: int | None) -> SourceVersion:
    """The version to quantize; raises RepositoryError or ConfigError naming what is wrong."""
    check_model_name(model)
    model_dir = repository / model
    if not model_dir.is_dir():
        found = (
            sorted(d.name for d in repository.iterdir() if d.is_dir() and versions(d))
            if repository.is_dir()
            else []
        )
        raise RepositoryError(
            f"no model '{model}' in the repository '{repository}'; models there: "
            f"{', '.join(found) or 'none'}"
        )
    published = versions(model_dir)
    if not published:
        raise RepositoryError(f"model '{model}' in '{repository}' has no published version")
    if version is None:
        version = published[-1]
    elif version not in published:
        raise RepositoryError(
            f"model '{model}' has no version {version}; versions: {', '.join(map(str, published))}"
        )
    path = model_dir / str(version) / MODEL_FILE
    try:
        graph = onnx.load(str(path))
    except Exception as error:  # onnx raises DecodeError and others, undocumented
        raise ConfigError(f"'{path}' is not a readable ONNX model: {error}") from error
    metadata = {p.key: p.value for p in graph.metadata_props}
    source = SourceVersion(repository, model, version, path, metadata)
    check_quantizable(source, graph)
    return source


def check_quantizable(source: SourceVersion, graph: onnx.ModelProto) -> None:
    """Refuses what is not an FP32 convserve model (docs/model-repository.md)."""
    where = f"'{source.path}'"
    metadata = source.metadata
    if FORMAT_KEY not in metadata:
        raise ConfigError(
            f"{where} is not a convserve model: its metadata has no {FORMAT_KEY} "
            f"(docs/model-repository.md); quantize a model written by 'python -m training "
            f"train' or 'export-arch'"
        )
    if metadata[FORMAT_KEY] != CONTRACT_FORMAT:
        raise ConfigError(
            f"{where} has {FORMAT_KEY} {metadata[FORMAT_KEY]!r}; this command "
            f"quantizes format {CONTRACT_FORMAT!r} only"
        )
    missing = [key for key in REQUIRED_KEYS if not metadata.get(key)]
    if missing:
        raise ConfigError(f"{where} lacks the contract's metadata: {', '.join(missing)}")
    if QUANTIZATION_KEY in metadata or any(n.op_type in QUANTIZED_OPS for n in graph.graph.node):
        record = json.loads(metadata.get(QUANTIZATION_KEY) or "{}").get("source", {})
        origin = f" (INT8 of {record['model']} version {record['version']})" if record else ""
        raise ConfigError(f"{where} is already quantized{origin}; quantize its FP32 source instead")
    try:
        shape = source.image_shape
        if not source.labels:
            raise ValueError(f"{LABELS_KEY} is empty")
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{where} has invalid contract metadata: {error!r}") from error
    try:
        check_structure(graph, shape)
    except ExportError as error:
        raise ConfigError(f"{where} does not follow the contract: {error}") from error


def load_source_data(source: SourceVersion, config: QuantizeConfig) -> Dataset:
    """The data set the source was trained on, split exactly as in training."""
    training = json.loads(source.metadata.get(TRAINING_KEY) or "{}")
    stored = training.get("data") if isinstance(training, dict) else None
    if not isinstance(stored, dict) or not stored.get("dataset"):
        raise ConfigError(
            f"model '{source.model}' version {source.version} was not trained on a data set "
            f"({DATASET_KEY} {source.metadata.get(DATASET_KEY, '')!r}): there are no "
            f"training images to calibrate on; pass --calibration random to calibrate on random "
            f"pixels (its accuracy is then not measured)"
        )
    known = {f.name for f in dataclasses.fields(DataConfig)}
    values = {key: value for key, value in stored.items() if key in known}
    values["download"] = config.download
    if config.data_dir is not None:
        values["data_dir"] = config.data_dir
    dataset = load_data(DataConfig(**values))
    if tuple(dataset.train.images.shape[1:]) != source.image_shape:
        raise ConfigError(
            f"the data set's images are {dataset.train.images.shape[1:]} but the model takes "
            f"{source.image_shape} (C, H, W); pass the --data-dir the model was trained on"
        )
    return dataset


def calibration_sample(images: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A seeded sample of ``count`` images (all of them when there are fewer)."""
    if count < 1:
        raise ConfigError(f"--calibration-images must be at least 1, got {count}")
    order = np.random.default_rng(seed).permutation(len(images))[:count]
    return np.ascontiguousarray(images[np.sort(order)])


class _Batches(ortq.CalibrationDataReader):
    """Feeds the calibration images to ONNX Runtime's calibrator, a batch at a time."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self._batches = iter(
            [images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)]
        )
        self._input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch}


def normalisation_nodes(graph: onnx.ModelProto) -> list[str]:
    """The nodes reachable from the uint8 input without passing a weighted op: the cast and
    ``(x/255 - mean) / std``. They stay FP32, and one QuantizeLinear follows them."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    kept: list[str] = []
    frontier = [i.name for i in graph.graph.input]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type not in WEIGHTED_OPS and node.name not in kept:
                kept.append(node.name)
                frontier.extend(node.output)
    return kept


def quantize_file(
    source: Path, target: Path, images: np.ndarray, config: QuantizeConfig
) -> list[str]:
    """Writes the QDQ INT8 model of ``source`` to ``target``; returns the nodes kept FP32."""
    with tempfile.TemporaryDirectory(prefix="quantize-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Shape inference and ONNX Runtime's basic graph fusions, as ONNX Runtime recommends
        # before quantizing; the quantizer then sees the tensor shapes it needs.
        # The entropy and percentile calibrators report progress on stdout.
        with contextlib.redirect_stdout(io.StringIO()) as chatter:
            try:
                ortq.quant_pre_process(str(source), str(prepared))
                kept = normalisation_nodes(onnx.load(str(prepared)))
                ortq.quantize_static(
                    str(prepared),
                    str(target),
                    _Batches(images, INPUT_NAME),
                    quant_format=ortq.QuantFormat.QDQ,
                    per_channel=config.per_channel,
                    reduce_range=config.reduce_range,
                    activation_type=ortq.QuantType.QUInt8,
                    weight_type=ortq.QuantType.QInt8,
                    nodes_to_exclude=kept,
                    calibrate_method=METHODS[config.calibration_method],
                )
            except Exception as error:  # the quantizer raises many types, undocumented
                raise ExportError(f"ONNX Runtime could not quantize '{source}': {error}") from error
        logger.debug("quantizer output: %s", chatter.getvalue())
    return kept


def quantized_op_types(graph: onnx.ModelProto) -> list[str]:
    """Op types that read a DequantizeLinear output: the ops the quantizer wrapped in QDQ."""
    dequantized = {o for n in graph.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sorted(
        {
            n.op_type
            for n in graph.graph.node
            if n.op_type not in QUANTIZED_OPS and dequantized.intersection(n.input)
        }
    )


def runtime_graph(path: Path) -> dict[str, int]:
    """Op types of the graph ONNX Runtime runs on this CPU after its fusions, with counts: a
    ``DequantizeLinear -> Conv -> QuantizeLinear`` it has an INT8 kernel for becomes one
    ``QLinearConv``; what it has none for stays an FP32 op between the two."""
    with tempfile.TemporaryDirectory(prefix="quantize-") as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        counts = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    return dict(sorted(counts.items()))


def int8_cpu_features() -> list[str]:
    """The CPU's 8-bit dot-product extensions (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return [flag for flag in INT8_CPU_FLAGS if flag in flags]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _agreement(fp32: np.ndarray, int8: np.ndarray) -> float:
    return float(np.mean(fp32 == int8)) if len(fp32) else float("nan")


def quantize_version(config: QuantizeConfig) -> QuantizedVersion:
    """``python -m training quantize``: the source version -> the next INT8 version."""
    if config.calibration not in CALIBRATION_SOURCES:
        raise ConfigError(
            f"unknown calibration '{config.calibration}'; choose one of: "
            f"{', '.join(CALIBRATION_SOURCES)}"
        )
    if config.calibration_method not in METHODS:
        raise ConfigError(
            f"unknown calibration method '{config.calibration_method}'; choose one of: "
            f"{', '.join(METHODS)}"
        )
    source = find_source(config.repository, config.model, config.version)
    check_model_name(config.target_model)
    dataset: Dataset | None = None
    if config.calibration == "train":
        dataset = load_source_data(source, config)
        calibration = calibration_sample(
            dataset.train.images, config.calibration_images, config.seed
        )
        described = f"a sample of the train split of {dataset.name} ({len(dataset.train)} images)"
    else:
        rng = np.random.default_rng(config.seed)
        shape = (config.calibration_images, *source.image_shape)
        calibration = rng.integers(0, 256, size=shape, dtype=np.uint8)
        described = "random uint8 pixels"
    logger.info(
        "quantizing %s version %d: %d calibration images (%s)",
        source.model, source.version, len(calibration), described,
    )  # fmt: skip
    with staging_directory(config.repository / config.target_model) as staging:
        onnx_path = staging / MODEL_FILE
        kept = quantize_file(source.path, onnx_path, calibration, config)
        quantized = onnx.load(str(onnx_path))
        check_structure(quantized, source.image_shape)
        record, per_class = _measure(source, onnx_path, dataset, config)
        record.update(
            method="static",
            format="QDQ",
            tool=f"onnxruntime.quantization {ort.__version__}",
            activations="uint8, asymmetric, per tensor",
            weights=f"int8, symmetric, {'per channel' if config.per_channel else 'per tensor'}",
            reduce_range=config.reduce_range,
            quantized_ops=quantized_op_types(quantized),
            runtime_graph=runtime_graph(onnx_path),
            fp32_nodes=kept,
            calibration={
                "source": config.calibration,
                "images": len(calibration),
                "from": described,
                "method": config.calibration_method,
                "seed": config.seed,
            },
            source={
                "model": source.model,
                "version": source.version,
                "sha256": _sha256(source.path),
                "test_accuracy": source.metadata.get(TEST_ACCURACY_KEY, ""),
            },
            cpu_int8_features=int8_cpu_features(),
        )
        _check_accuracy(record, config)
        metadata = _metadata(source, record)
        write_quantization_report(
            staging / REPORT_DIR,
            record=record,
            classes=source.labels,
            per_class=per_class,
            target_model=config.target_model,
            fp32_bytes=source.path.stat().st_size,
            int8_bytes=onnx_path.stat().st_size,
            command=config.command(),
        )
        embed_metadata(onnx_path, metadata)
        write_version_files(staging, source.labels, metadata)
        version, path = publish(staging, staging.parent)
    return QuantizedVersion(
        config.target_model, version, path, source.model, source.version, record
    )


def _measure(
    source: SourceVersion, int8_path: Path, dataset: Dataset | None, config: QuantizeConfig
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """FP32 and INT8 on the same images: the test split, or (untrained) fresh random pixels.

    Returns the record's figures and the per-class accuracies (FP32, INT8) for the report.
    """
    if dataset is None:
        rng = np.random.default_rng(config.seed + 1)
        shape = (RANDOM_EVALUATION_IMAGES, *source.image_shape)
        images = rng.integers(0, 256, size=shape, dtype=np.uint8)
        fp32 = onnx_logits(onnx_session(source.path), images).argmax(axis=1)
        int8 = onnx_logits(onnx_session(int8_path), images).argmax(axis=1)
        figures = {
            "evaluation_images": len(images),
            "evaluated_on": "random uint8 pixels, not a test split",
            "fp32_test_accuracy": None,
            "int8_test_accuracy": None,
            "top1_agreement": _agreement(fp32, int8),
        }
        return figures, {}
    test = dataset.test
    classes = len(dataset.classes)
    before: Evaluation = evaluate_onnx(source.path, test.images, test.labels, classes)
    after: Evaluation = evaluate_onnx(int8_path, test.images, test.labels, classes)
    figures = {
        "evaluation_images": len(test),
        "evaluated_on": f"test split of {dataset.name}",
        "fp32_test_accuracy": round(before.accuracy, 6),
        "int8_test_accuracy": round(after.accuracy, 6),
        "top1_agreement": _agreement(before.predictions, after.predictions),
    }
    return figures, {"fp32": before.per_class_accuracy, "int8": after.per_class_accuracy}


def _check_accuracy(record: dict[str, Any], config: QuantizeConfig) -> None:
    fp32, int8 = record["fp32_test_accuracy"], record["int8_test_accuracy"]
    if fp32 is None or int8 is None:
        return
    drop = 100 * (fp32 - int8)
    if drop > config.max_accuracy_drop:
        raise ExportError(
            f"INT8 test accuracy {int8:.4f} is {drop:.2f} points below FP32 {fp32:.4f} "
            f"(allowed: {config.max_accuracy_drop} points); nothing was published. Try "
            f"--calibration-method entropy or percentile, more --calibration-images, per-channel "
            f"weights (no --per-tensor), or a larger --max-accuracy-drop"
        )


def _metadata(source: SourceVersion, record: dict[str, Any]) -> dict[str, str]:
    """The source's contract metadata, the INT8 test accuracy, and the quantization record."""
    meta = source.metadata
    int8 = record["int8_test_accuracy"]
    metadata = contract_metadata(
        labels=source.labels,
        preprocessing=json.loads(meta[PREPROCESSING_KEY]),
        model_config=json.loads(meta.get(MODEL_CONFIG_KEY) or "{}"),
        training=json.loads(meta.get(TRAINING_KEY) or "{}"),
        dataset=meta.get(DATASET_KEY, ""),
        test_accuracy=int8,
    )
    metadata[QUANTIZATION_KEY] = json.dumps(record, sort_keys=True)
    return metadata
