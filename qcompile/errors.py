"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class QCompileError(Exception):
    """Base class: the message alone tells the user what to fix."""


class ModelFileError(QCompileError):
    """The model file is missing, does not import, or lacks an entry point."""


class CheckpointError(QCompileError):
    """A checkpoint cannot be read or does not match the model."""


class CaptureError(QCompileError):
    """torch.fx could not capture the model."""


class RecipeError(QCompileError):
    """An unknown recipe, or an override that is malformed, matches nothing, or cannot be honoured."""


class PipelineError(QCompileError):
    """A pass ran without what it requires, or broke the graph."""


class DataError(QCompileError):
    """A data set path is wrong, empty, or not in a supported layout."""
