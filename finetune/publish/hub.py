"""Push an adapter or merged-model folder to the Hugging Face Hub (`finetune push`, and a pass's `hub.repo_id`).

The token comes from the usual places (HF_TOKEN, or `huggingface-cli login`) and is never written or
printed. No path of this machine is pushed: recipe copies, adapter configs and the trainer state go up as
public copies, `training_args.bin` not at all. Nothing in the local folder is changed, so a failed upload
leaves it intact, says why, and exits non-zero. Folders over 20 GiB go through `upload_large_folder`
(resumable, several commits).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from finetune.errors import CheckFailed, InputError
from finetune.files.adapter_folder import ADAPTER_CONFIG, read_adapter_config
from finetune.files.hub_ids import looks_like_hub_id, public_name
from finetune.files.output_folder import RUN_LOCK_FILE
from finetune.publish.card import public_recipe
from finetune.recipe.resolved import RECIPE_FILE
from finetune.recipe.typed_yaml import parse_yaml

LARGE_FOLDER_BYTES = 20 * 1024**3


class PushError(CheckFailed):
    """The upload did not complete; the local folder is untouched."""


NEVER_PUSHED = ("training_args.bin", RUN_LOCK_FILE)
"""training_args.bin: TrainingArguments pickled by transformers, holding this machine's output_dir and nothing a
user of the model needs; the run lock (finetune/files/output_folder.py), which only means something here."""


def files_to_push(folder: Path, include_checkpoints: bool) -> list[str]:
    """The folder's files as pushed, by relative path: training checkpoints only when asked; never
    training_args.bin, nor the lock of the run that trained there."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and path.name not in NEVER_PUSHED and (
                include_checkpoints or not relative.startswith("checkpoint-")):
            files.append(relative)
    return files


def public_copies(folder: Path, files: list[str], base_id: str | None) -> dict[str, bytes]:
    """{path: the bytes pushed in its place} for the files that name this machine's paths: every recipe.yaml
    (paths replaced by their public names, finetune/publish/card.py), every adapter_config.json (its base named
    by Hub id: the recorded one, or `base_id`) and trainer_state.json (its best checkpoint by name). The local
    files are never changed: resume and export keep reading them."""
    copies = {}
    for relative in files:
        path = folder / relative
        if path.name == RECIPE_FILE:
            header = "# Resolved recipe; paths of the machine it ran on are given by their last part.\n"
            body = yaml.safe_dump(public_recipe(parse_yaml(path.read_text()) or {}), sort_keys=False)
            copies[relative] = (header + body).encode()
        elif path.name == ADAPTER_CONFIG:
            config = read_adapter_config(path.parent)
            config["base_model_name_or_path"] = hub_base(path.parent, config.get("base_model_name_or_path"), base_id)
            copies[relative] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        elif path.name == "trainer_state.json":
            state = json.loads(path.read_text())
            state["best_model_checkpoint"] = public_name(state.get("best_model_checkpoint"))
            copies[relative] = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
    return copies


def hub_base(adapter: Path, recorded: str | None, base_id: str | None) -> str:
    """The base's Hub id for a pushed adapter config: `base_id` if given, else the recorded base if it is one."""
    if base_id is not None:
        if not looks_like_hub_id(base_id):
            raise InputError(f"--base-id must look like ORG/NAME, got {base_id!r}")
        return base_id
    if recorded and looks_like_hub_id(recorded) and not Path(recorded).is_absolute():
        return recorded
    raise InputError(f"{adapter}: the adapter names its base by a path of this machine ({public_name(recorded)}); "
                     "give the base's Hub id with --base-id ORG/NAME (recipes: hub.base_id), so the pushed adapter "
                     "loads anywhere")


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         include_checkpoints: bool = False, base_id: str | None = None) -> str:
    """Upload `folder` to `repo_id` in one commit (training checkpoints left out unless asked), the files that
    name this machine's paths replaced by public copies (`public_copies`); returns the commit URL (the
    repository URL for large folders, which go up resumably in several commits)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise InputError(f"{folder}: not a folder with files to push")
    if not looks_like_hub_id(repo_id):
        raise InputError(f"--repo-id must look like ORG/NAME, got {repo_id!r}")
    files = files_to_push(folder, include_checkpoints)
    public = public_copies(folder, files, base_id)  # refuses before any network
    message = f"Upload {folder.name} with mixtral-finetune"
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        if sum((folder / f).stat().st_size for f in files) > LARGE_FOLDER_BYTES:
            api.upload_large_folder(repo_id=repo_id, folder_path=folder, revision=revision, repo_type="model",
                                    allow_patterns=[f for f in files if f not in public])
            files = list(public)
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=public.get(f, str(folder / f))) for f in files]
        commit = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
        return commit.commit_url
    except Exception as err:  # noqa: BLE001 - the network edge: HTTP status, transport (httpx or httpx2), disk
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PushError(f"upload of {folder} to {repo_id} at {api.endpoint} failed ({type(err).__name__}: {reason}); "
                        "the local folder is intact") from None
