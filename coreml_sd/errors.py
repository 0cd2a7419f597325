"""Errors a user can act on. Each message says what was expected, what was found, and the choices."""


class CoreMLSDError(Exception):
    """Base class: the CLI prints these as one line and exits 1 (usage errors exit 2 via click)."""


class ModelError(CoreMLSDError):
    """A model path or file is missing, corrupt, unsafe or of an unsupported kind."""


class UnsafeFileError(ModelError):
    """A pickled file references something other than tensors and plain containers."""


class InputError(CoreMLSDError):
    """An input tensor or option does not match what a component expects."""


class OutputError(CoreMLSDError):
    """An output could not be written: the disk is full, a size limit, no permission, a file in the way."""


class BackendUnavailable(CoreMLSDError):
    """A backend cannot run here (engine not installed, wrong OS, device absent)."""


def choices_text(choices) -> str:
    return ", ".join(str(c) for c in choices)
