"""The dreamshard pipeline: config, teachers, storage, shards, the Ray task graph, CLI."""

__version__ = "0.1.0"
