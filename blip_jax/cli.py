"""The command-line convention of every blip_jax command (`blip-jax-train`, `-convert`, `-predict`,
`-capfilt`): bad input (a missing file, a wrong checkpoint, an option out of range) is one line
`error: ...` on stderr and exit status 2, like argparse's own usage errors; anything else is a
bug and shows its traceback (status 1)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from blip_jax import storage

# What the project raises for input a user can fix (ConversionError, ImageError, InputError and
# the config errors are ValueErrors; missing or unreadable files are OSErrors; an output on a
# full or read-only disk is a storage.OutputError).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               storage.OutputError)


class InputError(ValueError):
  """Bad command-line input."""


def main(run: Callable[[Sequence[str]], object], argv: Sequence[str] | None = None,
         also: tuple[type[Exception], ...] = ()) -> int:
  """`run(argv)` with the convention above (`also`: more exception types that mean bad input);
  returns the exit status."""
  try:
    run(sys.argv[1:] if argv is None else list(argv))
  except USER_ERRORS + also as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except OSError as e:  # a write the project does not wrap (a log, a lock file) on a full disk
    problem = storage.disk_problem(e, e.filename or 'an output')
    if problem is None:
      raise
    print(f'error: {problem}', file=sys.stderr)
    return 2
  return 0
