"""The dashboard's web resources, and the token rule.

Paths: ``/`` the page; ``/static/lab.css``, ``/static/lab.js``, ``/static/favicon.svg``
(package data, served by popgate: the page works offline, nothing comes from a CDN);
``/events`` server-sent events (see :class:`~popgate.web.board.LabBoard`);
``/api/sessions`` and ``/api/mailboxes`` JSON (the latter from a Maildir survey begun
after the request); ``/metrics`` when metrics are on.

Token: with ``[web] token`` set (required by the configuration unless every listener is
loopback), every request must carry it: ``Authorization: Bearer TOKEN``, ``?token=TOKEN``
(which also sets an HttpOnly cookie, so that the page's own requests and EventSource
carry it), or that cookie.  Anything else gets ``401``.  The access log is off: URLs may
carry the token, and a dashboard polls.  Every response forbids framing and scripts from
elsewhere (Content-Security-Policy).  An event stream sends nothing while its browser
does not read, then catches up with a snapshot (:class:`_Stream`).  At most
``max_streams`` event streams are open at once (``503`` beyond).  Reactor thread only.
"""

from __future__ import annotations

import hmac
import json
from importlib import resources as package_files

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from popgate.web.board import LabBoard

log = Logger()

COOKIE = b"popgate_lab"
_STATIC = {"lab.css": b"text/css; charset=utf-8",
           "lab.js": b"text/javascript; charset=utf-8",
           "favicon.svg": b"image/svg+xml"}
_HEARTBEAT = 15.0  # seconds: a comment line that lets proxies and browsers see life
_SECURITY_HEADERS = {
    b"content-security-policy": (b"default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                b"frame-ancestors 'none'"),
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-store",
}


class QuietSite(Site):
    """A Site without an access log (tokens in URLs; a dashboard polls)."""

    noisy = False

    def log(self, request) -> None:
        pass


def build_site(board: LabBoard, clock, token: str = "", metrics_page=None,
               max_streams: int = 20) -> QuietSite:
    root = Resource()
    root.putChild(b"", _Bytes(_asset("index.html"), b"text/html; charset=utf-8"))
    static = Resource()
    for name, content_type in _STATIC.items():
        static.putChild(name.encode(), _Bytes(_asset(name), content_type))
    root.putChild(b"static", static)
    root.putChild(b"events", EventStream(board, clock, max_streams))
    api = Resource()
    api.putChild(b"sessions", _JSON(board.sessions_json))
    api.putChild(b"mailboxes", _JSON(board.fresh_mailboxes_json))
    root.putChild(b"api", api)
    if metrics_page is not None:
        root.putChild(b"metrics", metrics_page)
    return QuietSite(TokenGate(root, token) if token else _Headers(root))


def _asset(name: str) -> bytes:
    return package_files.files("popgate.web").joinpath("static", name).read_bytes()


class _Headers(Resource):
    """Adds the security headers to every response of the wrapped tree."""

    def __init__(self, root: Resource):
        super().__init__()
        self._root = root

    def getChildWithDefault(self, path, request):
        for name, value in _SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return self._root.getChildWithDefault(path, request)


class TokenGate(_Headers):
    """Lets a request through only with the token (see the module docstring)."""

    def __init__(self, root: Resource, token: str):
        super().__init__(root)
        self._token = token.encode("utf-8")

    def getChildWithDefault(self, path, request):
        given = _bearer(request) or request.args.get(b"token", [b""])[0]
        if given and hmac.compare_digest(given, self._token):
            if request.args.get(b"token"):
                request.addCookie(COOKIE, self._token, path=b"/", httpOnly=True,
                                  sameSite="strict")
        elif not hmac.compare_digest(request.getCookie(COOKIE) or b"", self._token):
            return _Unauthorized()
        return super().getChildWithDefault(path, request)


def _bearer(request) -> bytes:
    header = request.getHeader(b"authorization") or b""
    scheme, _, value = header.partition(b" ")
    return value.strip() if scheme.lower() == b"bearer" else b""


class _Unauthorized(Resource):
    isLeaf = True

    def render(self, request) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"www-authenticate", b'Bearer realm="popgate lab"')
        return b"401: this dashboard needs its token: open /?token=TOKEN ([web] token)\n"


class _Bytes(Resource):
    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes):
        super().__init__()
        self._body = body
        self._type = content_type

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", self._type)
        return self._body

    def render_HEAD(self, request) -> bytes:
        request.setHeader(b"content-type", self._type)
        request.setHeader(b"content-length", b"%d" % len(self._body))
        return b""


class _JSON(Resource):
    isLeaf = True

    def __init__(self, produce):
        super().__init__()
        self._produce = produce

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        finished = request.notifyFinish()  # the client may go away while a survey runs
        finished.addErrback(lambda _: None)  # ... which is no error here
        d = defer.maybeDeferred(self._produce)
        d.addCallback(self._write, request, finished)
        d.addErrback(self._failed, request, finished)
        return NOT_DONE_YET

    @staticmethod
    def _write(result, request, finished) -> None:
        if not finished.called:
            request.write(json.dumps(result, separators=(",", ":")).encode())
            request.finish()

    @staticmethod
    def _failed(failure, request, finished) -> None:
        # The path, not the URI: its query may carry the token.
        log.failure("lab dashboard: cannot answer {path}", failure,
                    path=request.path.decode("ascii", "replace"))
        if not finished.called:
            request.setResponseCode(500)
            request.finish()


class EventStream(Resource):
    """``/events``: text/event-stream until the browser goes away."""

    isLeaf = True

    def __init__(self, board: LabBoard, clock, max_streams: int):
        super().__init__()
        self._board = board
        self._clock = clock
        self._max_streams = max_streams

    def render_GET(self, request):
        if self._board.streams >= self._max_streams:
            request.setResponseCode(503)
            return b"too many dashboards open\n"
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"retry: 2000\n\n")
        _Stream(self._board, self._clock, request)
        return NOT_DONE_YET


@implementer(IPushProducer)
class _Stream:
    """One open ``/events`` response: board changes, and a heartbeat comment.

    A browser that stops reading (a laptop put to sleep) must not make the server buffer
    without end: the stream is the response's push producer; while the transport says
    pause, changes are dropped, and a fresh snapshot is sent when it says resume.
    """

    def __init__(self, board: LabBoard, clock, request):
        self._board = board
        self._clock = clock
        self._request = request
        self._paused = False
        self._missed = False
        request.registerProducer(self, True)
        self._remove = board.add_stream(self._write)
        self._heartbeat = clock.callLater(_HEARTBEAT, self._beat)
        request.notifyFinish().addBoth(self._finished)

    def _write(self, chunk: bytes) -> None:
        if self._paused:
            self._missed = True
        else:
            self._request.write(chunk)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._missed:
            self._missed = False
            self._request.write(self._board.snapshot())

    def stopProducing(self) -> None:
        self._paused = True

    def _beat(self) -> None:
        self._write(b": alive\n\n")
        self._heartbeat = self._clock.callLater(_HEARTBEAT, self._beat)

    def _finished(self, _ignored) -> None:
        self._remove()
        if self._heartbeat.active():
            self._heartbeat.cancel()
