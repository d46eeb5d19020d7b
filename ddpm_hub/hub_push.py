"""Pushing a final pipeline folder to the Hub with huggingface_hub: checked before training, retried, token-safe.

Retries: huggingface_hub retries its pre-upload and LFS requests itself; we retry, with backoff, only the requests
it does not (whoami, create_repo, the commit), so no request is retried by two layers.
Only the pipeline (model_index.json, unet/, scheduler/, README.md, samples.png, metrics.json, and a conditional
pipeline's pipeline.py) is uploaded,
never checkpoints, optimizer state or logs. The token comes from the argument, HF_TOKEN or the saved login;
it is never printed, logged or written anywhere by this module, and is scrubbed from error messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

logger = logging.getLogger(__name__)
T = TypeVar("T")

PIPELINE_PATTERNS = [
    "model_index.json",
    "README.md",
    "samples.png",
    "metrics.json",
    "unet/config.json",
    "unet/*.safetensors",
    "scheduler/scheduler_config.json",
    "pipeline.py",  # a class-conditional pipeline's code, for stock diffusers' custom_pipeline
]
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class HubError(RuntimeError):
    """A Hub operation that failed for good; the message says what to do and never contains the token."""


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def check_repo_id(repo_id: str | None) -> str:
    """A valid `org/name` repo id, or HubError naming it."""
    if not repo_id or "/" not in repo_id:
        raise HubError(f"--hub_model_id {repo_id!r} must look like ORG/NAME (e.g. my-org/ddpm-cifar10)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"--hub_model_id {repo_id!r} is not a valid repo id: {exc}") from exc
    return repo_id


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


# Requests that huggingface_hub already retries itself (`http_backoff`: 5 retries with backoff on 429/5xx,
# timeouts and dropped connections): a failure of one of these has outlasted the client's own retries, so we
# report it instead of retrying the whole operation again (one retry layer per request, never nested).
CLIENT_RETRIED = ("/preupload/", "/info/lfs", "/objects/batch", "xet")


def _request_url(exc: BaseException) -> str:
    for holder in (getattr(exc, "response", None), exc):
        try:
            request = getattr(holder, "request", None)
        except RuntimeError:  # httpx raises when an exception carries no request
            request = None
        if request is not None:
            return str(getattr(request, "url", ""))
    return ""


def _is_retryable(exc: BaseException) -> bool:
    """5xx/429/408 answers and transport failures (timeouts, refused or dropped connections) are transient;
    other HTTP answers and programming errors are not; neither is a request the client already retried."""
    if any(marker in _request_url(exc) for marker in CLIENT_RETRIED):
        return False
    if isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        return status is None or status in RETRYABLE_STATUS
    if isinstance(exc, (HubError, ValueError, TypeError, KeyError, AttributeError, FileNotFoundError)):
        return False
    return True


def with_retries(
    action: Callable[[], T], what: str, token: str | None, attempts: int = 5, base_delay: float = 1.0
) -> T:
    """Run `action`, retrying transient failures (5xx, 429, timeouts, dropped connections) with exponential
    backoff; permanent ones (401, 403, 404, bad input) are reported at once as HubError."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:
            status = _status(exc)
            message = _scrub(f"{type(exc).__name__}: {exc}", token)
            if status in (401, 403):
                raise HubError(
                    f"{what}: not authorised ({status}). Log in with `hf auth login` or set HF_TOKEN to a token "
                    "with write access to this repo."
                ) from None
            if status == 404:
                raise HubError(f"{what}: not found (404): {message}") from None
            if not _is_retryable(exc) or attempt == attempts:
                raise HubError(f"{what} failed after {attempt} attempt(s): {message}") from None
            delay = base_delay * 2 ** (attempt - 1)
            logger.warning("%s failed (%s); retrying in %.1fs (%d/%d)", what, message, delay, attempt, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")


def check_push_access(repo_id: str, token: str | None = None, private: bool = False, attempts: int = 5) -> str:
    """Before training: validate the id, check the credentials (whoami) and create the repo if needed."""
    check_repo_id(repo_id)
    api = HfApi(token=token)
    with_retries(lambda: api.whoami(), "checking Hub credentials", token, attempts)
    url = with_retries(
        lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
        f"creating {repo_id}",
        token,
        attempts,
    )
    return str(url)


def push_pipeline_folder(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload DDPM pipeline",
    attempts: int = 5,
    base_delay: float = 1.0,
) -> str:
    """Upload the final pipeline files of `folder` (never checkpoints or logs); unchanged files are skipped."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise HubError(f"{folder} is not a pipeline folder (no model_index.json): train first, then push")
    if not any((folder / "unet").glob("*.safetensors")):
        raise HubError(f"{folder}/unet has no safetensors weights: only safetensors are pushed")
    check_repo_id(repo_id)
    api = HfApi(token=token)
    with_retries(
        lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
        f"creating {repo_id}",
        token,
        attempts,
        base_delay,
    )
    info = with_retries(
        lambda: api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            allow_patterns=PIPELINE_PATTERNS,
            commit_message=commit_message,
            repo_type="model",
        ),
        f"uploading {folder} to {repo_id}",
        token,
        attempts,
        base_delay,
    )
    return str(getattr(info, "commit_url", info))
