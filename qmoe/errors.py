"""The exceptions qmoe raises at its boundaries.

Every error a user can cause (a bad file, an unsupported model, a bad argument)
is a `QmoeError` whose message names the file or value and says what was
expected, so the CLI can print it as one line instead of a traceback.
"""


class QmoeError(Exception):
    """Base class of every error qmoe raises on purpose."""


class GGUFFormatError(QmoeError):
    """A GGUF file is malformed, truncated, or lacks a required key or tensor."""


class UnsupportedArchitectureError(QmoeError):
    """The model's architecture is not one qmoe knows."""


class UnsupportedTensorTypeError(QmoeError):
    """A tensor is stored in a type qmoe's kernels cannot compute with."""


class ConversionError(QmoeError):
    """A Hugging Face checkpoint cannot be converted (missing shard, tensor, bad shape)."""


class TokenizerError(QmoeError):
    """The tokenizer metadata is missing or inconsistent."""


class ContextOverflowError(QmoeError):
    """The prompt plus the requested tokens do not fit the context."""


class PredictorMismatchError(QmoeError):
    """A predictor sidecar was made for another model."""


class CalibrationDataError(QmoeError):
    """A calibration directory is missing, incomplete or inconsistent."""
