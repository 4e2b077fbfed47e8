"""Fault injection for subprocess tests: put this folder on PYTHONPATH and set one variable.

- FAULT_KILL_DURING_SAVE=SUBSTRING: the first torch.save / safetensors save_file to a path containing
  SUBSTRING writes half its bytes, then the process SIGKILLs itself (a kill in the middle of a save).
- FAULT_KILL_AFTER_SAVES=N: SIGKILL right after the N-th safetensors save_file completes.
- FAULT_SIGTERM_DURING_SAVE=SUBSTRING: the process sends itself SIGTERM as a safetensors save_file to a path
  containing SUBSTRING starts (what a scheduler's stop signal does when it lands during a save).

Python imports `sitecustomize` at start-up, before any of the program's modules, so the programs under
test bind the wrapped functions. Without either variable this does nothing.
"""

import os
import signal

DURING = os.environ.get("FAULT_KILL_DURING_SAVE")
AFTER = int(os.environ.get("FAULT_KILL_AFTER_SAVES", "0"))
SIGTERM_DURING = os.environ.get("FAULT_SIGTERM_DURING_SAVE")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


if DURING or AFTER or SIGTERM_DURING:
    import io

    import safetensors.torch
    import torch

    real_torch_save, real_save_file = torch.save, safetensors.torch.save_file
    saves = [0]

    def torch_save(obj, f, *args, **kwargs):
        if DURING and isinstance(f, (str, os.PathLike)) and DURING in str(f):
            buffer = io.BytesIO()
            real_torch_save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            _die()
        return real_torch_save(obj, f, *args, **kwargs)

    def save_file(tensors, filename, *args, **kwargs):
        if SIGTERM_DURING and SIGTERM_DURING in str(filename):
            os.kill(os.getpid(), signal.SIGTERM)
        if DURING and DURING in str(filename):
            real_save_file(tensors, filename, *args, **kwargs)
            with open(filename, "r+b") as out:
                out.truncate(os.path.getsize(filename) // 2)
            _die()
        result = real_save_file(tensors, filename, *args, **kwargs)
        saves[0] += 1
        if AFTER and saves[0] >= AFTER:
            _die()
        return result

    torch.save, safetensors.torch.save_file = torch_save, save_file
