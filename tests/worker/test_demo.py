"""`ctdx demo` as a new user runs it: the real command in a child process, its output a pipe
(not a terminal), on a fresh cache.

- the first run trains the demonstration model and says so at least every 10 s;
- the closing hint is one line that works when pasted into a shell, venv not activated;
- with real CT and the synthetic model the result line says the call means nothing;
- a configured CTDX_MODEL that cannot be loaded stops the demo before anything is sent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CTDX = Path(sys.executable).parent / "ctdx"
MEANS_NOTHING = "MEANS NOTHING for this patient"
MAX_SILENCE_S = 10.0


@dataclass(frozen=True)
class Run:
    code: int
    lines: list[tuple[float, str]]  # (seconds since start, line) as they arrived

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTDX_")}
    # as a new user: the venv is not activated, so its bin is not on PATH
    bin_dir = str(CTDX.parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p != bin_dir)
    env.pop("VIRTUAL_ENV", None)
    env.update({"XDG_CACHE_HOME": str(tmp / "user-cache"), "COLUMNS": "80", **extra})
    return env


def _demo(tmp: Path, *args: str, env: dict[str, str], timeout: float = 1500) -> Run:
    """Run `ctdx demo`, recording when each output line arrives."""
    start = time.monotonic()
    proc = subprocess.Popen([str(CTDX), "demo", "--data-dir", str(tmp / "demo"), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    return Run(code, lines)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    """The first run on a fresh cache: trains the demonstration model, sends the phantom."""
    tmp = tmp_path_factory.mktemp("demo")
    return tmp, _demo(tmp, env=_env(tmp))


def test_first_run_reports_progress_at_least_every_10_s(first_run: tuple[Path, Run]) -> None:
    _, run = first_run
    assert run.code == 0, run.text
    texts = [line for _, line in run.lines]
    begin = next(i for i, t in enumerate(texts) if "preparing the synthetic demonstration" in t)
    end = next(i for i, t in enumerate(texts) if t.startswith("model: "))
    times = [at for at, _ in run.lines[begin : end + 1]]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) >= 4, run.text
    assert max(gaps) <= MAX_SILENCE_S, (max(gaps), run.text)
    training = "\n".join(texts[begin:end])
    assert "training the recognition (ResNet50) network, epoch 1/" in training
    assert "int8" in training


def test_phantom_is_called_covid_without_a_warning(first_run: tuple[Path, Run]) -> None:
    _, run = first_run
    assert "decision: covid19" in run.text, run.text
    assert MEANS_NOTHING not in run.text


def test_closing_hint_is_one_pasteable_line(first_run: tuple[Path, Run], tmp_path: Path
                                            ) -> None:
    tmp, run = first_run
    texts = [line for _, line in run.lines]
    at = next(i for i, t in enumerate(texts) if "Explore further with:" in t)
    hint = texts[at + 1].strip()
    assert hint.startswith("CTDX_DATABASE_URL=sqlite:///")
    assert f"{CTDX} results show " in hint  # the venv's script by its path: PATH lacks it
    # pasted into a shell without the venv activated, from another folder
    env = _env(tmp)
    result = subprocess.run(["bash", "-c", hint], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "covid19" in result.stdout


def test_real_ct_with_the_demo_model_says_the_call_means_nothing(
        first_run: tuple[Path, Run], shared_data: Path) -> None:
    tmp, _ = first_run  # the demonstration model is cached now
    series = shared_data / "covid-ct-md" / "Normal" / "normal001"
    run = _demo(tmp, "--input", str(series), env=_env(tmp))
    assert run.code == 0, run.text
    decision = next(line for _, line in run.lines if line.startswith("decision: "))
    assert MEANS_NOTHING in decision, run.text


@pytest.mark.parametrize("content", [None, b"", b"PK\x03\x04 truncated"])
def test_an_unusable_ctdx_model_stops_the_demo_before_sending(tmp_path: Path,
                                                              content: bytes | None) -> None:
    model = tmp_path / "model.pt"
    if content is not None:
        model.write_bytes(content)
    run = _demo(tmp_path, env=_env(tmp_path, CTDX_MODEL=str(model)), timeout=300)
    assert run.code != 0
    assert "CTDX_MODEL" in run.text and "nothing was sent" in run.text, run.text
    assert "Traceback" not in run.text
    assert not list((tmp_path / "demo").glob("run-*")), "the demo went on after the check"
