"""The one exception kdpipe raises for bad input: the CLI prints its message and exits non-zero."""

import click


class KdpipeError(click.ClickException):
    """A user-facing error: one clear paragraph naming the file, row or option at fault."""

    exit_code = 2
