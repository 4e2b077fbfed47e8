"""The one kind of error a user fixes by changing their input.

Every message names the input (recipe file and key, data file and line, folder, option) and the fix.
Every entry point (`python -m finetune.X` and `finetune X`) prints it as one `error:` line and exits 2
(`finetune.cli.run_guarded`); anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input, named in the message with the way to fix it."""
