"""Bad input and failed runs, reported in one line: the errors every module raises, the exit they
lead to, and the check for an optional package."""
import functools
import importlib.util
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): reported in one line, exit code 2."""


class Diverged(UserError):
    """The loss (or the model) turned non-finite: exit code 3, which Slurm does not requeue."""
    exit_code = 3


DIVERGED = "diverged.json"  # what a diverged run leaves in its folder (common/failures.py)


def exit_on_user_error(main):
    """Decorator for a script's main(): a UserError prints `error: ...` and exits with 2 (or its
    `exit_code`). Under torchrun, other exceptions are `record`ed in the worker's error file, so
    that torchrun's failure summary shows the failing rank's traceback, not only its exit code."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(getattr(e, "exit_code", 2))
    return record(wrapper) if "TORCHELASTIC_ERROR_FILE" in os.environ else wrapper


def installed(package, flag=None):
    """Whether the optional `package` can be imported, without importing it; if `flag` asked for
    it and it is missing, a UserError with the install command."""
    if importlib.util.find_spec(package) is not None:
        return True
    if flag:
        raise UserError(f"{flag} needs the {package} package: pip install {package} "
                        f"(or pip install -r requirements-extras.txt)")
    return False
