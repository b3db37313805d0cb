"""Generated from protos/ by `python -m service.tools.protogen`; do not edit."""
