"""Triton's model and repository messages from the model manager's state: ModelConfig,
ModelStatistics and RepositoryIndex. Pure conversions, tested without gRPC, like converters.py.
"""

from __future__ import annotations

from collections.abc import Sequence

from service._proto import grpc_service_pb2 as pb2
from service.engine.manager import IndexRow, LoadedModel
from service.engine.runtime import CUDA
from service.engine.statistics import Duration, VersionStatistics
from service.repository.disk import MODEL_FILE
from service.repository.policy import VersionPolicy
from service.wire.converters import PLATFORM

BACKEND = "onnxruntime"


def version_policy(policy: VersionPolicy) -> pb2.ModelVersionPolicy:
    message = pb2.ModelVersionPolicy()
    if policy.kind == "latest":
        message.latest.num_versions = policy.count
    elif policy.kind == "all":
        message.all.SetInParent()
    else:
        message.specific.versions.extend(policy.versions)
    return message


def model_config(model: LoadedModel, policy: VersionPolicy) -> pb2.ModelConfig:
    """The version's configuration as Triton states it: max_batch_size > 0, so the tensors'
    dims leave out the batch dimension."""
    spec, batching = model.spec, model.batching
    on_gpu = model.runtime.provider == CUDA
    group = pb2.ModelInstanceGroup(
        name=f"{spec.name}_{spec.version}",
        kind=pb2.ModelInstanceGroup.KIND_GPU if on_gpu else pb2.ModelInstanceGroup.KIND_CPU,
        count=batching.max_concurrent_batches,
        gpus=[0] if on_gpu else [],
    )
    return pb2.ModelConfig(
        name=spec.name,
        platform=PLATFORM,
        backend=BACKEND,
        version_policy=version_policy(policy),
        max_batch_size=batching.max_batch_size,
        input=[
            pb2.ModelInput(
                name=spec.preprocessing.input_name,
                data_type=pb2.TYPE_UINT8,
                format=pb2.ModelInput.FORMAT_NCHW,
                dims=list(spec.input_shape),
            )
        ],
        output=[
            pb2.ModelOutput(
                name=spec.preprocessing.output_name,
                data_type=pb2.TYPE_FP32,
                dims=[len(spec.labels)],
            )
        ],
        instance_group=[group],
        default_model_filename=MODEL_FILE,
        dynamic_batching=pb2.ModelDynamicBatching(
            max_queue_delay_microseconds=batching.max_queue_delay_us
        ),
    )


def _duration(value: Duration) -> pb2.StatisticDuration:
    return pb2.StatisticDuration(count=value.count, ns=value.ns)


def model_statistics(name: str, version: int, stats: VersionStatistics) -> pb2.ModelStatistics:
    """One version's counters (service/engine/statistics.py says what each one means)."""
    return pb2.ModelStatistics(
        name=name,
        version=str(version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb2.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
            cache_hit=pb2.StatisticDuration(),
            cache_miss=pb2.StatisticDuration(),
        ),
        batch_stats=[
            pb2.InferBatchStatistics(batch_size=size, compute_infer=_duration(duration))
            for size, duration in sorted(stats.batches.items())
        ],
    )


def repository_index(rows: Sequence[IndexRow]) -> pb2.RepositoryIndexResponse:
    return pb2.RepositoryIndexResponse(
        models=[
            pb2.RepositoryIndexResponse.ModelIndex(
                name=row.name, version=row.version, state=row.state, reason=row.reason
            )
            for row in rows
        ]
    )
