"""Our exceptions: bad user input (printed as a single line) and a polite stop request."""


class UserError(Exception):
    """Bad input (file, flag, model): the message names what is wrong and how to fix it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so the trainer checkpoints first."""
