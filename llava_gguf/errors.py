"""The project's exceptions. Library code raises these; only the CLI turns them into messages."""

from __future__ import annotations


class LlavaGGUFError(Exception):
    """Base class: every error the library raises on purpose is one of these."""


class CheckpointError(LlavaGGUFError):
    """The source checkpoint is missing, incomplete, corrupt or not a LLaVA model."""


class ConversionError(LlavaGGUFError):
    """Writing or quantizing a GGUF failed."""


class GGUFFormatError(LlavaGGUFError):
    """A GGUF file is not what the runtime expects (wrong architecture, missing keys)."""


class ImageError(LlavaGGUFError):
    """An image could not be read or decoded."""


class ContextOverflowError(LlavaGGUFError):
    """The prompt (text plus image tokens) does not fit in the context window."""


class ModelLoadError(LlavaGGUFError):
    """The model files could not be loaded, or do not belong together."""


class PromptError(LlavaGGUFError):
    """The prompt's image placeholders and the images given do not agree."""
