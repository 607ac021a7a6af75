"""The one exception type for bad user input: its message is printed as a single line."""


class UserError(Exception):
    """Bad input (file, flag, model): the message names what is wrong and how to fix it."""
