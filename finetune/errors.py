"""The two kinds of failure a command reports in one `error:` line (finetune.cli.run_guarded, the same for
`python -m finetune.X` and `finetune X`); anything else is a bug and keeps its traceback.

- `InputError`, exit 2: bad input. The message names it (recipe file and key, data file and line, folder,
  option) and the fix; nothing was written.
- `CheckFailed`, exit 1: the work ran but failed its own check (an export that does not reproduce base +
  adapters, an upload that did not complete); the message says what is left as it was.
"""


class InputError(ValueError):
    """Bad input, named in the message with the way to fix it."""


class CheckFailed(RuntimeError):
    """The work ran and failed its own check; nothing it should not have touched was changed."""
