"""The tracking-store probe that runs before any stage: fast, one line, no MLflow import needed."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from pipeline.tracking import TrackingUnavailable, check_reachable, resolve_uri, ui_command


@pytest.fixture
def http_server():
    """A local HTTP server that answers every request with 404 (like a proxy without /health)."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_server_that_answers_is_reachable(http_server):
    check_reachable(http_server)  # no exception: any HTTP answer means the server is there


def test_unreachable_server_and_database():
    with pytest.raises(TrackingUnavailable) as info:
        check_reachable("http://127.0.0.1:9", timeout=2)
    assert str(info.value).startswith("tracking.uri: MLflow tracking server unreachable (")
    with pytest.raises(TrackingUnavailable) as info:
        check_reachable("postgresql://user@127.0.0.1:9/mlflow", timeout=2)
    assert str(info.value).startswith("tracking.uri: database unreachable (")
    assert str(info.value).endswith("(got 'postgresql://user@127.0.0.1:9/mlflow')")


def test_sqlite_folder_is_created(tmp_path):
    uri = f"sqlite:///{tmp_path / 'a' / 'b' / 'mlflow.db'}"
    check_reachable(uri)
    assert (tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrackingUnavailable, match=r"^tracking\.uri: cannot create "):
        check_reachable(f"sqlite:///{blocker / 'sub' / 'mlflow.db'}")


def test_default_uri_and_ui_command(tmp_path, monkeypatch):
    import sys

    from pipeline.config import PipelineConfig

    config = PipelineConfig.model_validate({"run": {"name": "x", "output_dir": str(tmp_path)},
                                            "model": {"name_or_path": "org/m"}})  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'x' / 'mlflow.db'}"
    assert resolve_uri(config) == uri
    # mlflow sits next to this Python: named by its path unless that folder is on PATH
    scripts = Path(sys.executable).parent
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.chdir(scripts.parent)
    assert ui_command(uri) == f"{scripts.name}/mlflow ui --backend-store-uri {uri}"  # relative to the cwd
    monkeypatch.chdir(tmp_path)
    assert ui_command(uri) == f"{scripts / 'mlflow'} ui --backend-store-uri {uri}"
    monkeypatch.setenv("PATH", f"/usr/bin:{scripts}")
    assert ui_command(uri) == f"mlflow ui --backend-store-uri {uri}"
    assert ui_command("https://mlflow.example.org") == "open https://mlflow.example.org in a browser"
