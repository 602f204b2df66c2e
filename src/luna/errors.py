"""The one exception type for errors a user can cause and fix.

A missing file, a malformed CSV or an odd DICOM series raises `LunaError` with a
message that names the file and says what to do. Command-line entry points catch
it (see `luna.cli.main_guard`) and print it as one line on stderr with exit
status 2, without a traceback; anything else is a bug and keeps its traceback.
"""


class LunaError(Exception):
    """An error caused by the user's input or environment, with a fix in its message."""
