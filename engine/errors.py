"""The one base of every error that bad input raises (a malformed trace, profile, knobs or
policy file, a device or model that is not there): the command line prints such an error
as one line naming the file and exits 2, and lets any other exception, a bug, show its
traceback."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, with a message that says which and where."""
