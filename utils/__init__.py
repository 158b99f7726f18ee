"""Shared machinery of the condensation scripts: data, augmentation, synthetic sets, evaluation, runs."""


class UserError(Exception):
    """Bad input from the user. The main scripts print the message and exit with status 2, no traceback."""
