"""The volref error tree.

Every error a user can cause derives from :class:`VolrefError`; the command line prints its
message on one line and exits with status 2. Subclasses also inherit the builtin they resemble,
so ``except FileNotFoundError`` keeps working for library users (the zarr-python habit).
Anything else that escapes is a bug and is shown with its full traceback.
"""

from __future__ import annotations


class VolrefError(Exception):
    """Root of every error volref raises on purpose."""


class InputNotFoundError(VolrefError, FileNotFoundError):
    """A path or URL that does not exist."""


class NotOmeZarrError(VolrefError, ValueError):
    """The path exists but is not an OME-Zarr image volref can read."""


class InvalidMetadataError(NotOmeZarrError):
    """OME-Zarr metadata is present but broken (missing keys, wrong axes, shape mismatch)."""


class UnsupportedImageError(VolrefError, ValueError):
    """A readable image that volref cannot process (dimensionality, dtype, channel choice)."""


class OutputError(VolrefError, OSError):
    """The output location cannot be written (read-only, not a directory, ...)."""


class OutputExistsError(OutputError, FileExistsError):
    """The output already holds data and overwriting was not asked for."""


class InvalidNameError(VolrefError, ValueError):
    """A name that would escape its store or clash with the layout (``..``, ``/``, empty)."""


class ConfigError(VolrefError, ValueError):
    """A setting with an impossible value."""


class SettingsError(ConfigError):
    """A settings field with a value it cannot take; ``field`` names it (the command line maps
    it to its flag)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # pickles across Dask workers with its field
        return (type(self), (self.field, str(self)))


class ImageDataError(VolrefError, ValueError):
    """The image's voxels cannot be used: NaN/Inf intensities, or a chunk that cannot be read."""
