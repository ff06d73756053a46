"""The task graph's stages: plan, metadata, synthesis, retrieval, translation, manifest."""
