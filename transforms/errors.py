"""The one error class users see, with messages that say expected vs found."""

import re

_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit): ")


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
    if not own and lines and lines[0].startswith("in user code"):
        # A StagingError (or similar) wrapping another error: that error's own line, type included.
        inner = [line for line in lines if _ERROR_LINE.match(line)]
        if inner:
            return inner[-1][:limit]
    message = own[-1] if own else (lines[0] if lines else "")
    return f"{name}: {message[:limit]}"


_FUNCTION_NODE = re.compile(r"^\{\{function_node [^}]*\}\}\s*")
_OP_NOISE = ("Graph execution error", "Detected at node", "File ", "[[{{node")


def op_error_line(exc: BaseException, limit: int = 300) -> str:
    """A TensorFlow run-time error (`tf.errors.OpError`) as "Type: what the kernel said", without the
    graph's traceback ("Graph execution error", "Detected at node", file lines, node names)."""
    text = getattr(exc, "message", None) or str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    said = [_FUNCTION_NODE.sub("", line) for line in lines if not line.startswith(_OP_NOISE)]
    return f"{type(exc).__name__}: {(said[0] if said else one_line(exc))[:limit]}"


def own_message(exc: BaseException) -> str:
    """An exception's own message without TensorFlow's "in user code:" stack (for re-raising an AuditError)."""
    name = type(exc).__name__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    own = [line[len(name) + 1 :].strip() for line in lines if line.startswith(f"{name}:")]
    if own:
        return own[-1]
    return lines[-1] if lines and lines[0].startswith("in user code") else " ".join(lines)
