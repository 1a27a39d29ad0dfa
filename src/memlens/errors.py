"""Errors memlens raises on bad input: each says what was wrong and what to do instead.

The CLI prints these as one red line (no traceback); the API lets them propagate.
"""

from __future__ import annotations


class MemlensError(Exception):
    """Base class of every error memlens raises on purpose."""


class UnknownArchitecture(MemlensError):
    """The model's ``config.model_type`` has no adapter in :mod:`memlens.arch`."""


class ModelNotFound(MemlensError):
    """A model reference is neither a local directory, an organism, nor a reachable hub id."""


class HubUnreachable(ModelNotFound):
    """The Hugging Face hub cannot be reached and the model is not in the local cache."""


class UnknownOrganism(MemlensError):
    """An ``organism:NAME`` reference names no registered organism."""


class SubjectNotFound(MemlensError):
    """A subject string does not occur in its prompt."""


class EmptyInput(MemlensError):
    """A prompt, target or corpus is empty."""


class InputTooLong(MemlensError):
    """A prompt is longer than the model's context window."""


class NumericalError(MemlensError):
    """NaN or inf appeared in statistics or in an update; no weights were changed."""


class InvalidArgument(MemlensError, ValueError):
    """An option or argument has a value outside what it accepts (also a ValueError)."""


class LayerOutOfRange(MemlensError, IndexError):
    """A layer index is not one of the model's layers (also an IndexError)."""


class UnknownName(MemlensError, KeyError):
    """A name (hook, report layer, section) is not one of those known (also a KeyError)."""

    __str__ = Exception.__str__  # KeyError would quote the message


class InvalidModelFiles(ModelNotFound):
    """A model directory exists but its files cannot be read (corrupt, truncated, incomplete)."""


class InputFileError(MemlensError):
    """A file the user gave cannot be read: missing, a directory, not UTF-8, or not valid JSON."""


class EditDidNotTake(MemlensError):
    """An edit left its requests where they were (see :mod:`memlens.edit.outcome`)."""


class OffloadedWeightError(MemlensError):
    """An operation needs a weight in memory, but the device map offloads its module (see
    :mod:`memlens.offload`)."""
