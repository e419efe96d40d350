"""The one exception type the command-line steps turn into a one-line message and a non-zero exit."""


class InputError(Exception):
    """Bad input or a failed check: the message names the file, layer, expert or tensor at fault."""


def config_error_line(err: Exception) -> str:
    """One line naming the offending config key, from Snakemake's validate() error (raised while
    handling jsonschema's ValidationError, which names the key)."""
    from jsonschema import ValidationError

    cause = err.__context__ if isinstance(err.__context__, ValidationError) else None
    if cause is None:
        return f"error: invalid config: {str(err).splitlines()[0]}"
    key = ".".join(str(p) for p in cause.absolute_path) or "(top level)"
    return f"error: invalid config value at {key}: {cause.message}"
