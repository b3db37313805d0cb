"""The model repository on disk: its scan, the version policy and per-model config.json."""
