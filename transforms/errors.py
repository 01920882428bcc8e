"""The one error class users see, with messages that say expected vs found."""


class AuditError(ValueError):
    """A configuration or model problem found before or while building the job.

    Messages say what was expected, what was found and what to do.
    """


def one_line(exc: BaseException, limit: int = 300) -> str:
    """"Type: message" in one line, for wrapping a library's error into an AuditError.

    TensorFlow errors raised while tracing start with "in user code:" and a
    stack; their own message is on the line that starts with the type's name.
    """
    name = type(exc).__name__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    own = [line[len(name) + 1 :].strip() for line in lines if line.startswith(f"{name}:")]
    message = own[-1] if own else (lines[0] if lines else "")
    return f"{name}: {message[:limit]}"
