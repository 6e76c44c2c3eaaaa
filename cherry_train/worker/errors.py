"""Errors that end a job with a readable message and no traceback: the user's to fix."""


class JobError(Exception):
    """The job cannot run as configured (missing data, unknown model, bad weights file)."""
