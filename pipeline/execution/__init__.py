"""Execution: the Ray connection, the one actor pool (inline or Ray), progress, metrics."""
