"""huggingface_hub's failures as the project's errors, in one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from llava_gguf.errors import LlavaGGUFError


def how_to_get(repo_id: str, filename: str | None = None) -> str:
    what = f"{repo_id} {filename}" if filename else repo_id
    return f"download it once with network (`hf download {what}`), or unset HF_HUB_OFFLINE"


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
            f"{where} is not in the Hugging Face cache and the Hub cannot be reached (offline?); "
            + how_to_get(repo_id, filename)
        ) from e
    except OSError as e:
        raise error(f"{where}: download failed ({e})") from e
