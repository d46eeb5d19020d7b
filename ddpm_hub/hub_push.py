"""Pushing a final pipeline folder to the Hub with huggingface_hub: checked before training, retried, token-safe.

Retries: huggingface_hub retries its pre-upload and LFS requests itself; we retry, with backoff, only the requests
it does not (whoami, create_repo, the commit), so no request is retried by two layers.
Only the pipeline (model_index.json, unet/, scheduler/, README.md, samples.png, metrics.json, and the code files that
stock diffusers' custom_pipeline runs) is uploaded, never checkpoints, optimizer state or logs. The token comes from
the argument, HF_TOKEN or the saved login; it is never printed, logged or written anywhere by this module, and is
scrubbed from error messages.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from huggingface_hub import HfApi
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
)
from huggingface_hub.utils import validate_repo_id

from .files import NotARegularFile, open_inside

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
    # the code stock diffusers' custom_pipeline runs, all named pipeline*.py (pipeline_ddpm.REMOTE_CODE_FILES; not
    # imported, as pipeline_ddpm pushes through this module): a conditional folder's pipeline.py, and the editing
    # pipelines' pipeline_editing.py, its entry files and the loop's module pipeline_class_conditional.py
    "pipeline.py",
    "pipeline_*.py",
]
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class HubError(RuntimeError):
    """A Hub operation that failed for good; the message says what to do and never contains the token."""


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def check_repo_id(repo_id: str | None) -> str:
    """A valid `org/name` repo id, or HubError naming it."""
    if not repo_id or "/" not in repo_id:
        raise HubError(f"repo id {repo_id!r} must look like ORG/NAME or NAME (e.g. my-org/ddpm-cifar10)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"repo id {repo_id!r} is not a valid repo id: {exc}") from exc
    return repo_id


def resolve_repo_id(repo_id: str | None, token: str | None = None, attempts: int = 5) -> str:
    """`NAME` -> `USER/NAME` in the namespace of the token's user (whoami), as huggingface_hub's `create_repo`
    does; a valid `ORG/NAME` comes back unchanged. HubError naming a bad id or missing credentials."""
    if repo_id and "/" not in repo_id:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise HubError(f"repo id {repo_id!r} is not a valid repo id: {exc}") from exc
        info = with_retries(lambda: HfApi(token=token).whoami(), f"finding your namespace for {repo_id!r} (whoami)",
                            token, attempts)  # fmt: skip
        repo_id = f"{info['name']}/{repo_id}"
    return check_repo_id(repo_id)


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
            if isinstance(exc, LocalTokenNotFoundError):
                raise HubError(f"{what}: no Hub token: log in with `hf auth login` or set HF_TOKEN") from None
            if isinstance(exc, OfflineModeIsEnabled):
                raise HubError(f"{what}: offline mode is on (HF_HUB_OFFLINE=1); unset it to reach the Hub") from None
            if not _is_retryable(exc) or attempt == attempts:
                raise HubError(f"{what} failed after {attempt} attempt(s): {message}") from None
            delay = base_delay * 2 ** (attempt - 1)
            logger.warning("%s failed (%s); retrying in %.1fs (%d/%d)", what, message, delay, attempt, attempts)
            time.sleep(delay)
    raise AssertionError("unreachable")


def check_push_access(repo_id: str, token: str | None = None, private: bool = False, attempts: int = 5) -> str:
    """Before training: validate the id, check the credentials (whoami) and create the repo if needed."""
    api = HfApi(token=token)
    repo_id = resolve_repo_id(repo_id, token, attempts)
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
    """Upload the final pipeline files of `folder` (never checkpoints or logs); unchanged files are skipped. The
    uploaded card names `repo_id` in its usage snippet (the folder's own README.md is left as it is)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise HubError(f"{folder} is not a pipeline folder (no model_index.json): train first, then push")
    if not any((folder / "unet").glob("*.safetensors")):
        raise HubError(f"{folder}/unet has no safetensors weights: only safetensors are pushed")
    repo_id = resolve_repo_id(repo_id, token, attempts)
    operations = pipeline_operations(folder, repo_id)  # a planted link is refused before the Hub is changed
    try:
        api = HfApi(token=token)
        with_retries(
            lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
            f"creating {repo_id}",
            token,
            attempts,
            base_delay,
        )
        info = with_retries(
            lambda: api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=commit_message,
                repo_type="model",
            ),
            f"uploading {folder} to {repo_id}",
            token,
            attempts,
            base_delay,
        )
    finally:
        close_operations(operations)
    return str(getattr(info, "commit_url", info))


def pipeline_operations(folder: Path, repo_id: str) -> list:
    """The commit of a pipeline folder: the files of PIPELINE_PATTERNS, with README.md adapted to `repo_id`
    (`hub.card_for_repo`: the usage snippet loads the repo; no picture without samples.png). HubError for a
    symbolic link among them (or a linked `unet/`, `scheduler/`): only regular files inside the folder go."""
    from huggingface_hub import CommitOperationAdd

    from .hub import card_for_repo

    paths = sorted({p for pattern in PIPELINE_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    for path in paths:  # never upload what a link points to (a planted link to a secret would publish it)
        rel = path.relative_to(folder)
        link = next((p for p in (rel, *rel.parents) if p != Path(".") and (folder / p).is_symlink()), None)
        if link is not None:
            raise HubError(f"{folder / link} is a symbolic link: only regular files inside the folder are pushed; "
                           "replace the link with the file itself (or remove it) and push again")  # fmt: skip
    operations = []
    try:
        for path in paths:
            name = path.relative_to(folder).as_posix()
            try:  # opened now, following no link: the upload reads these very files (no swap after the check)
                content: BinaryIO | bytes = open_inside(folder, name)
            except NotARegularFile as exc:
                raise HubError(f"{exc.strerror or exc}: only regular files inside the folder, with no other hard "
                               "link, are pushed; replace it with a copy of the file itself and push again") from None
            if name == "README.md":
                with content:
                    text = content.read().decode()
                content = card_for_repo(text, repo_id, (folder / "samples.png").is_file()).encode()
            elif name == "metrics.json":
                with content:
                    content = _without_local_paths(content.read())
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
    except BaseException:
        close_operations(operations)
        raise
    return operations


def _without_local_paths(raw: bytes) -> bytes:
    """A run's metrics.json as pushed: without its `output_dir`, a path on the machine that trained it (which says
    nothing to the repo's readers and may name a user); anything not a JSON object goes as it is."""
    try:
        metrics = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(metrics, dict) or "output_dir" not in metrics:
        return raw
    metrics.pop("output_dir")
    return (json.dumps(metrics, indent=1) + "\n").encode()


def close_operations(operations: list) -> None:
    """Close the files that `pipeline_operations` opened for the upload."""
    for operation in operations:
        if hasattr(operation.path_or_fileobj, "close"):
            operation.path_or_fileobj.close()
