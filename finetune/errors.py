"""How a command fails, and the exit code each way of ending has: the one table of them.

Bad input and failed checks end in one `error:` line (finetune.cli.run_guarded, the same for
`python -m finetune.X` and `finetune X`); anything else is a bug and keeps its traceback.

| exit | name                | meaning                                                                        |
|------|---------------------|--------------------------------------------------------------------------------|
| 0    | -                   | done                                                                           |
| 1    | `EXIT_CHECK_FAILED` | `CheckFailed`: the work ran but failed its own check (an export that does not  |
|      |                     | reproduce base + adapters, an upload that did not complete); the message says |
|      |                     | what is left as it was                                                         |
| 2    | `EXIT_BAD_INPUT`    | `InputError`: bad input, named in the message (recipe file and key, data file |
|      |                     | and line, folder, option) with the fix; nothing was written                    |
| 3    | `EXIT_PUSH_FAILED`  | training finished and its outputs are saved, but the Hub push (`hub.repo_id`) |
|      |                     | failed: push them later with `finetune push`                                   |
| 75   | `EXIT_INTERRUPTED`  | stopped by SIGTERM with a checkpoint; run the same command again to continue   |
|      |                     | (EX_TEMPFAIL from sysexits.h, "try again later": a job script can requeue on it)|
| 130  | `EXIT_CTRL_C`       | stopped by Ctrl-C (128 + SIGINT, as a shell reports it)                       |
| 141  | `EXIT_BROKEN_PIPE`  | the reader of our output went away (`finetune chat ... | head -1`; 128 + SIGPIPE)|
| 143  | -                   | SIGTERM while tokenizing the data: the workers and the partial cache are gone  |
"""

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PUSH_FAILED = 3
EXIT_INTERRUPTED = 75
EXIT_CTRL_C = 130
EXIT_BROKEN_PIPE = 141


class InputError(ValueError):
    """Bad input, named in the message with the way to fix it (exit 2)."""


class CheckFailed(RuntimeError):
    """The work ran and failed its own check; nothing it should not have touched was changed (exit 1)."""
