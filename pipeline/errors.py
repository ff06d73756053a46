"""Errors the CLI turns into exit codes: 2 for bad input (nothing ran), 1 for a failure
during the run that its message explains fully (printed without a traceback)."""


class InputError(ValueError):
    """Bad input (config, checkpoint, URL, image). The message names the culprit."""


class RunError(RuntimeError):
    """A failure during the run whose message names what failed and what to do (exit 1)."""


class DeviceUnavailable(RunError):
    """A worker was given a device its node does not have (a GPU without CUDA): the run
    stops, naming the node, instead of computing on the CPU."""
