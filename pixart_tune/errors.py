"""The one exception type for problems with the user's input."""


class UserError(Exception):
    """Bad input (a path, a recipe, a file that does not fit the model).

    The CLI and the app print its message alone, without a traceback, so the message
    must say what is wrong and what to do about it.
    """
