"""Pushing an export directory to a Hugging Face Hub repository with huggingface_hub's own
``create_repo`` + ``upload_folder``. The token is huggingface_hub's (``HF_TOKEN`` or ``hf auth login``),
checked before any work; ``endpoint`` is a hub other than huggingface.co (a mirror, a self-hosted one)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from msmedcap.config import ConfigError


def hub_token() -> str:
    """huggingface_hub's token, or a ConfigError saying how to give one."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ConfigError("--push-to-hub: no Hugging Face token: set HF_TOKEN or run `hf auth login` "
                          "(a token with write access to the repository)")
    return token


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"--push-to-hub {repo_id!r}: {e}") from None


def push_folder(folder: Path, repo_id: str, token: str, endpoint: Optional[str] = None, private: bool = False,
                message: str = "msmedcap export") -> str:
    """Create ``repo_id`` if needed and upload ``folder`` as one commit; -> the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=message)
    return info.commit_url
