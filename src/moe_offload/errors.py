"""The one exception type the command-line steps turn into a one-line message and a non-zero exit."""


class InputError(Exception):
    """Bad input or a failed check: the message names the file, layer, expert or tensor at fault."""
