"""When ONNX Runtime's threads spin: the service's rule (`--intra-op-spinning auto`), which the
training package's INT8 benchmark follows too, so that it measures sessions as they are served.

Measured on two cores (docs/benchmark.md, "Spinning"): resnet18 (a batch of one 0.6-1.1 ms)
gains at every load with spinning (C=1 +32 %, C=4 +9 %, C=16 x 8 images +7 %, C=64 +4 %); the
small CNN (0.12-0.17 ms) loses a quarter of its throughput at 4 and 64 clients, where a run is
short beside the gRPC work around it (0.3-0.5 ms a request) and spinning threads take its cores.
"""

from __future__ import annotations

# A model on the CPU whose batch of one takes at least this long gets spinning threads.
SPIN_MIN_RUN_S = 0.5e-3
