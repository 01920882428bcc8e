"""The one error class users see, with messages that say expected vs found."""


class AuditError(ValueError):
    """A configuration or model problem found before or while building the job.

    Messages say what was expected, what was found and what to do.
    """
