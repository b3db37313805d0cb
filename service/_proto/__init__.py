"""Generated from protos/ by `python -m service.protogen`; do not edit."""
