"""Small helpers shared by the web app and the websocket server."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit


class ParameterError(ValueError):
    """Raised when a query parameter is missing, repeated or unreadable.

    The message names the parameter, never its value: query strings
    carry tokens.

    """

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f'{problem} query parameter {name!r}')
        self.name = name
        self.problem = problem


class MissingParameter(ParameterError):
    """Raised when a required query parameter is absent or empty."""

    def __init__(self, name: str) -> None:
        super().__init__(name, 'missing')


class RepeatedParameter(ParameterError):
    """Raised when a query parameter occurs more than once.

    A repeated parameter is ambiguous: two layers (a proxy, the server)
    could each pick a different occurrence.

    """

    def __init__(self, name: str) -> None:
        super().__init__(name, 'repeated')


class UnreadableParameter(ParameterError):
    """Raised when the query string is not valid percent-encoded UTF-8."""

    def __init__(self, name: str) -> None:
        super().__init__(name, 'unreadable')


def param_from_path(name: str, path: str) -> str:
    """Return the single, non-empty value of a query parameter in `path`.

    Raises:
        MissingParameter: if the parameter is absent or empty.
        RepeatedParameter: if the parameter occurs more than once.
        UnreadableParameter: if the query string cannot be decoded.

    """
    try:
        query = urlsplit(path).query
        params = parse_qs(
            query, keep_blank_values=True, errors='strict',
            max_num_fields=64
        )
    except (UnicodeError, ValueError):
        raise UnreadableParameter(name) from None

    values = params.get(name, [])
    if len(values) > 1:
        raise RepeatedParameter(name)
    if not values or not values[0]:
        raise MissingParameter(name)
    return values[0]
