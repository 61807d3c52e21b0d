"""Ray's state API error (`ray.util.state.exception`)."""


class RayStateApiException(Exception):
    """A state query could not be answered as asked (e.g. a filter on a column that
    cannot be filtered), as Ray raises it."""
