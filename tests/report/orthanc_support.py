"""Debian's ``Orthanc`` as a real PACS for the tests: started in a folder on free ports.

Plain (REST API and DICOM) for the report delivery tests; with the ``orthanc-dicomweb``
plugin at ``/dicom-web/`` for the viewer tests (:mod:`tests.report.viewer_support`).
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import free_port, require_tool, stop_process, wait_for

__all__ = ["Orthanc"]


class Orthanc:
    """Orthanc in ``workdir``, no authentication; DICOMweb too when given its ``dicomweb_plugin``.

    A failed start leaves no Orthanc behind; :meth:`stop` ends it.
    """

    def __init__(self, workdir: Path, ae_title: str = "ORTHANC",
                 dicomweb_plugin: Path | None = None) -> None:
        exe = require_tool("Orthanc")
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        storage = workdir / "storage"
        storage.mkdir(parents=True)
        config: dict[str, Any] = {
            "Name": "ctdx-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [],
        }
        self._ready_path = "/system"
        if dicomweb_plugin is not None:
            config["Plugins"] = [str(dicomweb_plugin)]
            config["DicomWeb"] = {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            }
            self._ready_path = "/dicom-web/studies"  # the plugin answers, not only the core
        config_path = workdir / "orthanc.json"
        config_path.write_text(json.dumps(config))
        self.log_path = workdir / "orthanc.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen([exe, str(config_path)], stdout=self._log,
                                        stderr=self._log)
        try:
            wait_for(self._up, timeout=120, message="Orthanc's REST API")
        except BaseException:
            self.stop()
            raise

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited: {self.log_path.read_text()[-2000:]}")
        try:
            self.get(self._ready_path)
        except OSError:
            return False
        return True

    def get(self, path: str) -> Any:
        """A GET on the REST API (or DICOMweb), decoded from JSON."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=20) as response:
            return json.load(response)

    def stop(self) -> None:
        stop_process(self.process, timeout=30)
        self._log.close()
