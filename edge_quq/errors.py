"""Errors that end a command with one clear line.

Every failure a user can cause (bad file, bad bundle, missing backend, bad option) raises a subclass of
EdgeQuqError whose message is that one line; the CLI prints it and exits non-zero. Anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations


class EdgeQuqError(Exception):
    """A user-facing failure; str(err) is the whole message."""

    exit_code = 2


class BundleError(EdgeQuqError):
    """The artifact bundle is missing, malformed, tampered with, or from a newer schema."""


class InputError(EdgeQuqError):
    """An input file or array cannot be used (unreadable, empty, wrong shape or dtype)."""


class BackendError(EdgeQuqError):
    """A requested runtime (TFLite interpreter, ONNX Runtime) is not installed or cannot load the model."""


class OptionError(EdgeQuqError):
    """An option value is out of its valid range."""


class ExportError(EdgeQuqError):
    """Host-side export cannot proceed (not a Keras model, head layers missing, bad calibration data)."""
