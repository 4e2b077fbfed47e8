"""Push an adapter or merged-model folder to the Hugging Face Hub (`finetune push`, and a pass's `hub.repo_id`).

The token comes from the usual places (HF_TOKEN, or `huggingface-cli login`) and is never written or
printed. The folder is uploaded as it is, model card (README.md) included; nothing in it is changed,
so a failed upload leaves it intact, says why, and exits non-zero. Folders over 20 GiB go through
`upload_large_folder` (resumable, several commits).
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import CheckFailed, InputError
from finetune.files.hub_ids import looks_like_hub_id

LARGE_FOLDER_BYTES = 20 * 1024**3


class PushError(CheckFailed):
    """The upload did not complete; the local folder is untouched."""


CHECKPOINTS = ["checkpoint-*/**", "checkpoint-*"]


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         include_checkpoints: bool = False) -> str:
    """Upload `folder` to `repo_id` (training checkpoints left out unless asked); returns the commit URL
    (or the repository URL for large folders)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise InputError(f"{folder}: not a folder with files to push")
    if not looks_like_hub_id(repo_id):
        raise InputError(f"--repo-id must look like ORG/NAME, got {repo_id!r}")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        ignore = None if include_checkpoints else CHECKPOINTS
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        if size > LARGE_FOLDER_BYTES:
            api.upload_large_folder(repo_id=repo_id, folder_path=folder, revision=revision, repo_type="model",
                                    ignore_patterns=ignore)
            return f"{api.endpoint}/{repo_id}"
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, ignore_patterns=ignore,
                                   commit_message=f"Upload {folder.name} with mixtral-finetune")
        return commit.commit_url
    except Exception as err:  # noqa: BLE001 - the network edge: HTTP status, transport (httpx or httpx2), disk
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PushError(f"upload of {folder} to {repo_id} at {api.endpoint} failed ({type(err).__name__}: {reason}); "
                        "the local folder is intact") from None
