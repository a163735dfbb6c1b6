"""Stand-ins for ``run_in_thread(f, *args) -> Deferred`` in protocol and delivery tests."""

from twisted.internet import defer


def synchronous(f, *args):
    """A run_in_thread stand-in that runs ``f`` at once."""
    return defer.maybeDeferred(f, *args)


class Deferring:
    """A run_in_thread stand-in that holds each call until the test runs it."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.calls.append((d, f, args))
        return d

    def run_next(self):
        d, f, args = self.calls.pop(0)
        try:
            result = f(*args)
        except Exception as e:  # handed to the Deferred, as a thread pool would
            d.errback(e)
        else:
            d.callback(result)
