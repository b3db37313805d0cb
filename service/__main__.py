"""Starts the inference server.

    python -m service --model-repository model_repository
    python -m service --host 127.0.0.1 --grpc-port 0 --metrics-port 0 --port-file ports.json

Every flag has a CONVSERVE_* environment variable; `python -m service --help` lists them.
"""

from service.server import main

if __name__ == "__main__":
    raise SystemExit(main())
