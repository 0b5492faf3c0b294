"""The one exception type that reaches users as a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input: the CLI prints ``error: <message>`` and exits with status 2, having changed nothing on disk."""


class RunFailed(UserError):
    """A run that failed after it started training: the message names the cause and what was kept (a checkpoint
    ``--resume`` continues from); ``cause`` is the original exception, ``checkpoint_step`` the step kept (or None)."""

    def __init__(self, message: str, cause: BaseException | None = None, checkpoint_step: int | None = None,
                 step: int | None = None):
        super().__init__(message)
        self.cause = cause
        self.checkpoint_step = checkpoint_step
        self.step = step  # the step that failed
