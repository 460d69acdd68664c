"""Errors whose message is meant for the person who sent the request."""


class InputError(ValueError):
    """The request cannot be served as sent; the message says what is wrong and what is allowed."""
