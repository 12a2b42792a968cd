"""What the command lines share: a bad config or bad input ends the run with its one-line
message and exit status 2 instead of a traceback (`--traceback` shows it)."""

import sys

from absl import flags

_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "On a bad config or input, show the whole traceback, not the message.")

# What the library raises for a bad config or input (named argument, value, what was
# expected), or a missing file; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError)


def guarded(fn, *args):
  """`fn(*args)`; a `USER_ERRORS` exception prints `error: <message>` and exits with 2."""
  try:
    return fn(*args)
  except USER_ERRORS as e:
    if _TRACEBACK.value:
      raise
    print(f"error: {e}", file=sys.stderr)
    print("(run with --traceback for the whole traceback)", file=sys.stderr)
    sys.exit(2)
