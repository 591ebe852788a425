"""The version of supersede, read by the build and by `supersede --version`."""

__version__ = "0.3.22"
