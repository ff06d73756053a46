"""Cluster operations: job submission to Ray clusters and nightly-run retention."""
