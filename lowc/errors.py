"""Errors that lowc reports to users as one line, with the exit code the CLI should use."""

from __future__ import annotations


class LowcError(Exception):
    """A failure caused by input or environment, shown to the user as one line (exit code 1)."""

    exit_code = 1


class UsageError(LowcError):
    """A bad flag, spec or path given by the user (exit code 2)."""

    exit_code = 2


class CheckpointError(LowcError):
    """An input checkpoint directory is missing, malformed, corrupted or unsupported."""


class ArtifactError(LowcError):
    """A lowc artifact is missing, malformed, tampered with or of an unknown version."""
