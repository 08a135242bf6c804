"""A real viewer for the tests: the OHIF Viewer on Orthanc's DICOMweb, opened in headless Chromium.

Three parts, each a real program started on free ports:

- :class:`OrthancDicomWeb`: Debian's ``Orthanc`` with the ``orthanc-dicomweb`` plugin, the PACS
  that ctdx sends its report objects to (DICOM port) and that the viewer reads (QIDO-RS/WADO-RS).
- :class:`ViewerServer`: the built OHIF Viewer (``dist/`` of the npm package ``@ohif/app``,
  unpacked by ``.ci/setup_viewer.sh`` into ``.cache/ohif``) served as static files, with the
  single-page app's route fallback to ``index.html``, a generated ``app-config.js`` and
  ``/dicom-web`` proxied to Orthanc, so that viewer and DICOMweb share one origin (no CORS).
- :class:`Browser`: ``chromium --headless`` driven over the Chrome DevTools protocol
  (``websocket-client``): navigate, read the page's text, take screenshots.

Whatever is missing makes the test skip with the reason (and how ``.ci/run`` installs it).
"""

from __future__ import annotations

import base64
import http.client
import json
import mimetypes
import shutil
import subprocess
import threading
import urllib.request
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, free_port, stop_process, wait_for
from tests.report.orthanc_support import Orthanc

#: The OHIF release the tests run; ``.ci/setup_viewer.sh`` unpacks the same one.
OHIF_VERSION = "3.13.2"
OHIF_DIST = REPO_ROOT / ".cache" / "ohif" / OHIF_VERSION / "dist"

DICOMWEB_PLUGIN_CANDIDATES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
    Path("/usr/lib/x86_64-linux-gnu/orthanc/plugins/libOrthancDicomWeb.so"),
)

SETUP_HINT = "bash .ci/run (or .ci/setup_viewer.sh) installs it"


def ohif_dist() -> Path:
    if not (OHIF_DIST / "index.html").is_file():
        pytest.skip(f"OHIF Viewer {OHIF_VERSION} not unpacked at {OHIF_DIST}; {SETUP_HINT}")
    return OHIF_DIST


def dicomweb_plugin() -> Path:
    for path in DICOMWEB_PLUGIN_CANDIDATES:
        if path.is_file():
            return path
    found = sorted(Path("/usr").glob("**/orthanc/**/libOrthancDicomWeb.so*"))
    if not found:
        pytest.skip(f"Orthanc's DICOMweb plugin (Debian orthanc-dicomweb) not found; {SETUP_HINT}")
    return found[0]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return str(shutil.which(name))
    pytest.skip(f"chromium not installed (Debian package chromium); {SETUP_HINT}")


def websocket_client() -> Any:
    return pytest.importorskip("websocket", reason="websocket-client (test extra) not installed")


class OrthancDicomWeb(Orthanc):
    """Orthanc with DICOMweb at ``/dicom-web/``, no authentication, in ``workdir``."""

    def __init__(self, workdir: Path, ae_title: str = "ORTHANC") -> None:
        super().__init__(workdir, ae_title, dicomweb_plugin=dicomweb_plugin())


def app_config(friendly_name: str) -> str:
    """OHIF's ``window.config``: one DICOMweb source on this origin (Orthanc behind /dicom-web).

    The roots are absolute because OHIF resolves bulk data and thumbnails against them.
    """
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": friendly_name,
            "name": "orthanc",
            "wadoUriRoot": "__ORIGIN__/wado",
            "qidoRoot": "__ORIGIN__/dicom-web",
            "wadoRoot": "__ORIGIN__/dicom-web",
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    text = json.dumps(config, indent=2).replace('"__ORIGIN__', 'window.location.origin + "')
    return f"window.config = {text};\n"


class ViewerServer:
    """OHIF's ``dist`` and Orthanc's DICOMweb on one origin (``http://127.0.0.1:<port>``)."""

    PROXIED = ("/dicom-web/", "/wado")

    def __init__(self, dist: Path, orthanc_http_port: int) -> None:
        self.dist = dist.resolve()
        self.orthanc_http_port = orthanc_http_port
        self.config = app_config("Orthanc (ctdx test PACS)").encode()
        self.port = free_port()
        self.requests: list[str] = []  # paths asked for, for failure messages
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                try:
                    if self.path.startswith(server.PROXIED):
                        server.proxy(self)
                    else:
                        server.static(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the browser went away (navigation): nothing to answer

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def static(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0].split("#", 1)[0]
        if path == "/app-config.js":
            self._send(handler, 200, "text/javascript", self.config)
            return
        target = (self.dist / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.dist) or not target.is_file():
            if Path(path).suffix:  # a missing asset stays missing
                self._send(handler, 404, "text/plain", b"not found")
                return
            target = self.dist / "index.html"  # the SPA's routes (/viewer, /) are client-side
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".wasm":
            kind = "application/wasm"
        self._send(handler, 200, kind, target.read_bytes())

    def proxy(self, handler: BaseHTTPRequestHandler) -> None:
        upstream = http.client.HTTPConnection("127.0.0.1", self.orthanc_http_port, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() in ("accept",)}
            upstream.request("GET", handler.path, headers=headers)
            response = upstream.getresponse()
            body = response.read()
            kind = response.getheader("Content-Type", "application/octet-stream")
            self._send(handler, response.status, kind, body)
        finally:
            upstream.close()

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, kind: str, body: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Cache-Control", "no-store")
        handler.end_headers()
        handler.wfile.write(body)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


class Browser:
    """Headless Chromium with a fresh profile, one page driven over the DevTools protocol."""

    FLAGS = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-breakpad",
        "--disable-crash-reporter",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        "--mute-audio",
        # WebGL on the CPU (SwiftShader): OHIF's viewports render with WebGL
        "--enable-unsafe-swiftshader",
        "--use-angle=swiftshader",
    )

    def __init__(self, workdir: Path, width: int = 1280, height: int = 760) -> None:
        exe = chromium()
        websocket = websocket_client()
        profile = workdir / "chromium-profile"
        profile.mkdir(parents=True)
        self.log_path = workdir / "chromium.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [exe, *self.FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=self._log, stderr=self._log,
        )
        active = profile / "DevToolsActivePort"
        wait_for(lambda: self._alive() and active.is_file() and active.read_text().count("\n"),
                 timeout=60, message="Chromium's DevTools port")
        port = int(active.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=20) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        self.ws = websocket.create_connection(
            pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True
        )
        self._id = 0
        self.console: list[str] = []
        self.call("Runtime.enable")
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"chromium exited: {self.log_path.read_text()[-2000:]}")
        return True

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result
            if message.get("method") == "Runtime.consoleAPICalled":
                args = message["params"].get("args", [])
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
                self.console.append(f"{message['params'].get('type')}: {text}"[:300])

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self) -> str:
        """What the page shows as text (``innerText`` of the body: rendered, visible text)."""
        value = self.evaluate("document.body ? document.body.innerText : ''")
        return str(value or "")

    def wait_for_text(self, *needles: str, timeout: float = 90.0) -> str:
        """The page's text once it contains every one of ``needles``."""
        seen = {"text": ""}

        def shown() -> bool:
            seen["text"] = self.text()
            return all(n in seen["text"] for n in needles)

        try:
            wait_for(shown, timeout=timeout, interval=0.5, message=f"the page to show {needles}")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\n--- page text ---\n{seen['text'][-3000:]}\n--- console ---\n"
                + "\n".join(self.console[-30:])
            ) from None
        return seen["text"]

    def click_text(self, selector: str, needle: str) -> None:
        """Click the first element matching ``selector`` whose text contains ``needle``."""
        script = (
            f"(() => {{ const el = [...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => e.innerText && e.innerText.includes({json.dumps(needle)}));"
            " if (!el) return false; el.scrollIntoView(); el.click(); return true; })()"
        )
        wait_for(lambda: self.evaluate(script), timeout=30, interval=0.5,
                 message=f"a {selector} showing {needle!r} to click")

    def element_centre(self, selector: str, needle: str) -> tuple[float, float] | None:
        """Centre of the last (innermost) visible ``selector`` showing ``needle`` ("": any)."""
        wanted = json.dumps(needle)
        script = (
            f"(() => {{ const els = [...document.querySelectorAll({json.dumps(selector)})]"
            f".filter(e => (!{wanted} || (e.innerText || '').includes({wanted}))"
            " && e.getBoundingClientRect().width > 0);"
            " if (!els.length) return null; const el = els[els.length - 1];"
            " el.scrollIntoView({block: 'nearest'}); const r = el.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        found = self.evaluate(script)
        return (float(found[0]), float(found[1])) if found else None

    def mouse_move(self, x: float, y: float) -> None:
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def mouse_click(self, x: float, y: float, clicks: int = 1) -> None:
        """A real click (mouse events through the browser's input pipeline) at ``x, y``."""
        self.mouse_move(x, y)
        for count in range(1, clicks + 1):
            for kind in ("mousePressed", "mouseReleased"):
                self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y,
                          button="left", clickCount=count)

    def click(self, selector: str, needle: str, clicks: int = 1, timeout: float = 30.0) -> None:
        """Click (``clicks=2``: double-click) the ``selector`` element showing ``needle``."""
        where = wait_for(lambda: self.element_centre(selector, needle), timeout=timeout,
                         interval=0.5, message=f"a {selector} showing {needle!r}")
        assert isinstance(where, tuple)
        self.mouse_click(where[0], where[1], clicks)

    def screenshot(self) -> bytes:
        """The page as it is drawn now (PNG)."""
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        with suppress(Exception):
            self.ws.close()
        stop_process(self.process, timeout=20)
        self._log.close()

