"""Errors the CLI turns into exit code 2: the user's input is wrong, nothing ran."""


class InputError(ValueError):
    """Bad input (config, checkpoint, URL, image). The message names the culprit."""
