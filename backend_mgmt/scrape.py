"""The Prometheus scrape target: ``GET /metrics`` over HTTP, served by python3-prometheus-client.

The library's WSGI server runs in its own thread and never touches the daemon's state: on
each scrape, its collector asks the event loop (``call_soon_threadsafe``) to render the
metrics text (``metrics.render``, the same text as the ``metrics`` command) and waits at most
``RENDER_WAIT`` seconds for it; should the loop be busy for longer, the previous text is
served. The text is handed to the library as parsed metric families, so the library does
the HTTP side: text format 0.0.4 (``text/plain; version=0.0.4``), OpenMetrics for a scraper
that asks for it, gzip.

Optional: without python3-prometheus-client the daemon runs and says why it does not serve.
"""

import logging
import socket
import threading

log = logging.getLogger(__name__)

RENDER_WAIT = 2.0        # seconds a scrape waits for the loop to render fresh text
STOP_WAIT = 2.0


class Unavailable(Exception):
    """The scrape target cannot be served (library missing, address in use...)."""


class ScrapeTarget:
    def __init__(self, loop, render, host, port):
        self.loop = loop
        self._render = render            # called on the loop's thread only
        self.host, self.port = host, port
        self.latest = "# no metrics rendered yet\n"
        self.scrapes = 0
        self._server = self._thread = None

    def start(self):
        """Bind and serve in a thread; raises Unavailable."""
        # Imported here, not with the module: the HTTP server's imports cost the daemon
        # several MiB, which only a daemon serving metrics should pay.
        try:
            from prometheus_client import CollectorRegistry, make_wsgi_app
            from prometheus_client.exposition import ThreadingWSGIServer
        except ImportError:
            raise Unavailable("python3-prometheus-client is not installed") from None
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        class QuietHandler(WSGIRequestHandler):
            def log_message(self, format, *args):      # no journal line per scrape
                pass
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class Server(ThreadingWSGIServer):
            address_family = family
        try:
            self._server = make_server(self.host, self.port, make_wsgi_app(registry), Server,
                                       handler_class=QuietHandler)
        except OSError as exc:
            raise Unavailable(f"cannot listen on {self.host}:{self.port}: "
                              f"{exc.strerror or exc}") from None
        self.port = self._server.server_address[1]      # the real one when 0 was asked
        # poll_interval None: the thread sleeps in select() until a scrape comes; close()
        # wakes it by shutting the listening socket down.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(None,),
                                        name="scrape", daemon=True)
        self._thread.start()

    # -- on the HTTP thread ----------------------------------------------------------------
    def collect(self):
        from prometheus_client.parser import text_string_to_metric_families
        rendered = threading.Event()
        try:
            self.loop.call_soon_threadsafe(lambda: self._render_on_loop(rendered))
            rendered.wait(RENDER_WAIT)
        except OSError:
            pass                         # the loop is closing: serve the last text
        yield from text_string_to_metric_families(self.latest)

    # -- on the loop -----------------------------------------------------------------------
    def _render_on_loop(self, rendered):
        try:
            self.latest = self._render()
            self.scrapes += 1
        finally:
            rendered.set()

    def close(self):
        if self._server is None:
            return
        stopper = threading.Thread(target=self._server.shutdown, daemon=True)
        stopper.start()
        try:
            # A shut-down listening socket stays readable: serve_forever's select() returns
            # and it sees the shutdown request.
            self._server.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        stopper.join(STOP_WAIT)
        self._thread.join(STOP_WAIT)
        self._server.server_close()
        self._server = None
