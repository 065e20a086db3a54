"""`--push-to-hub REPO`: one finished export folder to a Hugging Face hub repository.

Called only after the folder is complete, so any failure here (offline, no token, the
hub unreachable or refusing) is one line that says the local export is kept and how to
push it later; nothing is retried or deleted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from mia_dpo.errors import UserError

RepoType = Literal["dataset", "model"]
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def check_repo(repo: str) -> str:
    """Checked before any export work, so a typo never waits for a long export."""
    if not _REPO.match(repo) or ".." in repo or repo.endswith((".", "-")):
        raise UserError(f"--push-to-hub {repo!r}: expected a hub repository id OWNER/NAME")
    return repo


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "ON", "YES", "TRUE")


def push_folder(folder: Path, repo: str, repo_type: RepoType, *, private: bool = False) -> str:
    """Create `repo` if needed and upload `folder` to it; returns the repository URL."""
    check_repo(repo)
    later = f"{folder} is complete; push it later with: hf upload {repo} {folder} --repo-type {repo_type}"  # noqa: E501
    if _offline():
        raise UserError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set, nothing pushed; {later}")
    from huggingface_hub import HfApi, get_token

    token = get_token()  # HF_TOKEN, else the token `hf auth login` stored
    if not token:
        raise UserError(f"--push-to-hub {repo}: no hub token (set HF_TOKEN); {later}")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        url = api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo, folder_path=folder, repo_type=repo_type,
            commit_message=f"mia-dpo export: {folder.name}",
        )  # fmt: skip
    except Exception as e:  # whatever the hub or the network says: one line, folder kept
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"--push-to-hub {repo}: {type(e).__name__}: {why}; {later}") from None
    return str(url)
