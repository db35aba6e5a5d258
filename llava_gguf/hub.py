"""Reaching the Hub, and huggingface_hub's failures as the project's errors, in one place.

Before the first Hub call of a run, ``offline_reason`` asks the endpoint once, with a short timeout
and no retry: when it does not answer (no network, a firewall, a proxy that hangs), the run behaves as
with ``HF_HUB_OFFLINE=1`` (cached files only) instead of going through huggingface_hub's retries
(about 25 s of warnings before the same outcome).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator

from llava_gguf.errors import LlavaGGUFError

log = logging.getLogger(__name__)

REACH_TIMEOUT_S = 3.0
_TRUE = {"1", "on", "yes", "true"}


def offline_env() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def offline_reason() -> str | None:
    """Why only cached files can be used ("HF_HUB_OFFLINE is set", "the Hub ... cannot be reached"),
    or None when the Hub answers. The endpoint is asked once per process."""
    from huggingface_hub import constants

    if offline_env():
        return "HF_HUB_OFFLINE is set"
    return _unreachable(constants.ENDPOINT)


@functools.cache
def _unreachable(endpoint: str) -> str | None:
    """None when ``endpoint`` answers an HTTP HEAD (any status) within REACH_TIMEOUT_S, else why not.
    It goes through huggingface_hub's own session, so its proxy and certificate settings apply."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=REACH_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001  network failures come in many types (requests, httpx, ssl)
        log.info("the Hub at %s does not answer (%s: %s); using cached files only", endpoint, type(e).__name__, e)
        return f"the Hub ({endpoint}) cannot be reached"
    return None


def how_to_get(repo_id: str, filename: str | None = None) -> str:
    what = f"{repo_id} {filename}" if filename else repo_id
    remedy = "unset HF_HUB_OFFLINE" if offline_env() else "check the network (or HF_ENDPOINT)"
    return f"download it once with network (`hf download {what}`), or {remedy}"


@contextlib.contextmanager
def hub_errors(repo_id: str, error: type[LlavaGGUFError], *, revision: str | None = None,
               filename: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions inside the block into one-line ``error``s."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}/{filename}" if filename else repo_id
    try:
        yield
    except GatedRepoError as e:
        raise error(f"{repo_id} is gated: accept its licence on huggingface.co and set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise error(f"{repo_id}: no such Hub repo (or it is private: set HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise error(f"{repo_id}: no revision {revision!r}") from e
    except LocalEntryNotFoundError as e:
        raise error(
            f"{where} is not in the Hugging Face cache and {offline_reason() or 'the Hub cannot be reached'}; "
            + how_to_get(repo_id, filename)
        ) from e
    except OSError as e:
        raise error(f"{where}: download failed ({e})") from e
