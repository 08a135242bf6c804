"""``ctdx demo``: the whole product on one machine, no services, in a minute or two.

One process tree, wired like production but with embedded defaults:

1. a fresh data dir with a SQLite database (``ctdx db upgrade``);
2. a stand-in PACS: a pynetdicom storage SCP that keeps what it receives;
3. the listener (``ctdx.scp.server.ScpService``) with a short quiet period;
4. a worker: ``ctdx worker`` in a child process on the embedded broker
   (kombu's filesystem transport: no Redis);
5. a CT study sent by real C-STORE: a synthetic chest phantom, or ``--input DIR``;
6. wait for the SR at the stand-in PACS, then print the study's result, the SR's
   content tree, and the ``ctdx results list`` line for it.

With no ``CTDX_MODEL`` the demo uses the synthetic demonstration model
(``ctdx train demo-model``), labelled as such everywhere; its first run trains it
with a progress line at least every 5 s. On real CT (``--input``) the result line
says that its call means nothing for the patient. A configured ``CTDX_MODEL`` is
checked before anything is sent.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.process
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from ctdx.db.settings import Settings, load_settings

if TYPE_CHECKING:
    from ctdx.model_train.method.classes import Task
    from ctdx.model_train.progress import ProgressLines

logger = logging.getLogger(__name__)
console = Console()

SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
PHANTOM_MANUFACTURER = "ctdx synthetic phantom"  # what model_train.phantom writes
MEANINGLESS = ("MEANS NOTHING for this patient: the synthetic demonstration model knows only "
               "phantoms, not real CT")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pacs_main(folder: str, ae_title: str, port: int) -> None:
    """Child process: a storage SCP that writes each instance as received."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    out = Path(folder)

    def on_store(event: Any) -> int:
        path = out / f"{event.request.AffectedSOPInstanceUID}.dcm"
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(event.encoded_dataset())
        tmp.replace(path)
        return 0x0000

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])


class StandInPacs:
    """A storage SCP in its own process (its pynetdicom configuration is its own)."""

    def __init__(self, folder: Path, ae_title: str, port: int) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = port
        self._process: multiprocessing.process.BaseProcess | None = None

    def start(self, timeout: float = 30.0) -> StandInPacs:
        self.folder.mkdir(parents=True, exist_ok=True)
        ctx = multiprocessing.get_context("spawn")
        self._process = ctx.Process(
            target=_pacs_main, args=(str(self.folder), self.ae_title, self.port),
            name="ctdx-demo-pacs", daemon=True,
        )
        self._process.start()
        _wait(lambda: _accepts_connections(self.port), timeout, "the stand-in PACS to listen")
        return self

    def stop(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join(10)

    def received(self) -> list[Path]:
        return sorted(self.folder.glob("*.dcm"))


def _accepts_connections(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def send_study(paths: list[Path], host: str, port: int, called_ae: str,
               on_progress: Callable[[int], None]) -> int:
    """C-STORE every file, proposing each file's own transfer syntax; returns failures."""
    import pydicom
    from pynetdicom import AE

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    contexts = sorted({(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in headers})
    ae = AE(ae_title="CTDXDEMO")
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"the listener at {host}:{port} refused the association")
    failures = 0
    try:
        for index, path in enumerate(paths, start=1):
            status = assoc.send_c_store(pydicom.dcmread(path))
            if not status or status.Status != 0x0000:
                failures += 1
            on_progress(index)
    finally:
        assoc.release()
    return failures


def dicom_files(folder: Path) -> list[Path]:
    """Every DICOM file under ``folder`` (by the 'DICM' preamble, not by extension)."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM":
                found.append(path)
    return found


def sr_tree(dataset: Any) -> Tree:
    """The SR's content tree as a Rich tree (concept name: value)."""

    def label(item: Any) -> str:
        concept = item.get("ConceptNameCodeSequence")
        name = concept[0].CodeMeaning if concept else ""
        vt = item.ValueType
        if vt == "CODE":
            value = item.ConceptCodeSequence[0].CodeMeaning
        elif vt == "NUM":
            mv = item.MeasuredValueSequence[0] if "MeasuredValueSequence" in item else None
            value = (f"{mv.NumericValue} {mv.MeasurementUnitsCodeSequence[0].CodeValue}"
                     if mv is not None else "(no value)")
        elif vt in ("TEXT", "UIDREF", "DATETIME", "DATE", "TIME", "PNAME"):
            value = str(item.get(
                {"TEXT": "TextValue", "UIDREF": "UID", "DATETIME": "DateTime", "DATE": "Date",
                 "TIME": "Time", "PNAME": "PersonName"}[vt], ""))
        elif vt == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            value = f"image {ref.ReferencedSOPInstanceUID}"
        else:
            value = ""
        return f"[bold]{name}[/bold] ({vt}){': ' + value if value else ''}"

    def add(node: Tree, items: Any) -> None:
        for item in items:
            child = node.add(label(item))
            if "ContentSequence" not in item:
                continue
            concept = item.get("ConceptNameCodeSequence")
            if concept and concept[0].CodeMeaning == "Image Library":
                groups = item.ContentSequence
                images = sum(len(group.get("ContentSequence", [])) for group in groups)
                child.add(f"[dim]{images} source image(s), not shown[/dim]")
                continue
            add(child, item.ContentSequence)

    title = dataset.ConceptNameCodeSequence[0].CodeMeaning
    root = Tree(f"[bold]{title}[/bold]  (SR {dataset.SOPInstanceUID})")
    add(root, dataset.ContentSequence)
    return root


@dataclass(frozen=True)
class DemoModels:
    recognition: Path
    manifestation: Path | None
    synthetic: bool


def demo_models(settings: Settings, cache_dir: Path,
                progress: ProgressLines | None = None) -> DemoModels:
    """``CTDX_MODEL`` if set (checked here, before anything is sent), else the synthetic
    demonstration models (built once, cached)."""
    if settings.model is not None:
        check_models(settings.model, settings.manifestation_model)
        return DemoModels(settings.model, settings.manifestation_model, synthetic=False)
    from ctdx.model_train.demo_model import ensure_demo_models

    paths = ensure_demo_models(cache_dir, progress=progress)
    return DemoModels(paths.recognition, paths.manifestation, synthetic=True)


def check_models(recognition: Path, manifestation: Path | None) -> None:
    """Raise :class:`RuntimeError` naming the setting when a configured checkpoint is missing
    or is not one the worker can load (checked on the meta device: no weights in memory)."""
    from ctdx.model_train.method.checkpoint import CheckpointError, load_checkpoint

    checks: list[tuple[str, Path, Task]] = [("CTDX_MODEL", recognition, "recognition")]
    if manifestation is not None:
        checks.append(("CTDX_MANIFESTATION_MODEL", manifestation, "manifestation"))
    for name, path, task in checks:
        try:
            load_checkpoint(path, task=task, device="meta")
        except CheckpointError as exc:
            raise RuntimeError(f"{name}: {exc}; nothing was sent") from None


def is_phantom(header: Any) -> bool:
    """A series written by :mod:`ctdx.model_train.phantom` (its Manufacturer says so)."""
    return str(header.get("Manufacturer", "")) == PHANTOM_MANUFACTURER


def ctdx_command() -> str:
    """How to run ``ctdx`` again from any shell: the bare name when it is this installation's
    on PATH, else the absolute path of the script next to this Python (a venv's bin)."""
    import shutil

    script = Path(sys.executable).parent / "ctdx"
    if not script.is_file():
        return "ctdx"
    on_path = shutil.which("ctdx")
    if on_path is not None and Path(on_path).absolute() == script.absolute():
        return "ctdx"
    return str(script.absolute())


@contextmanager
def worker_process(settings: Settings, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``ctdx worker`` on the embedded broker, as a child process of the demo."""
    env = dict(os.environ)
    env.update(settings_environment(settings))
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from ctdx.cli import main; main()", "worker",
         "--pool", "solo", "--concurrency", "1", "--loglevel", "WARNING",
         "--hostname", f"demo-{os.getpid()}@%h"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def settings_environment(settings: Settings) -> dict[str, str]:
    """The settings as ``CTDX_*`` variables for a child process."""
    env: dict[str, str] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = ",".join(value)
        env[f"CTDX_{name.upper()}"] = str(value)
    env["CTDX_DATABASE_URL"] = settings.resolved_database_url
    return env


def _wait(predicate: Callable[[], Any], timeout: float, what: str,
          alive: Callable[[], str | None] = lambda: None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        problem = alive()
        if problem:
            raise RuntimeError(problem)
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def run_demo(input_dir: Path | None, data_dir: Path, timeout: float) -> int:
    """Run the demo; returns a process exit code."""
    import pydicom
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from sqlalchemy import select

    from ctdx.db import migrate
    from ctdx.db.models import Analysis, Study, StudyVersion
    from ctdx.db.session import make_engine, session_scope
    from ctdx.scp.server import ScpService

    started = time.monotonic()
    data_dir = data_dir.absolute()
    run_dir = data_dir / time.strftime("run-%Y%m%d-%H%M%S")
    base = load_settings()
    pacs_port, scp_port = _free_port(), _free_port()
    console.rule("[bold]ctdx demo")
    models = prepare_models(base, data_dir / "models")
    console.print(f"model: {models.recognition}"
                  + ("  [yellow](synthetic demonstration model - not for clinical use)[/yellow]"
                     if models.synthetic else ""), soft_wrap=True)
    settings = load_settings(
        data_dir=run_dir,
        database_url=f"sqlite:///{run_dir / 'ctdx.sqlite3'}",
        broker_url="embedded",
        host="127.0.0.1",
        port=scp_port,
        quiet_seconds=2.0,
        outbox_poll_seconds=0.5,
        min_free_bytes=min(base.min_free_bytes, 200_000_000),
        model=models.recognition,
        manifestation_model=models.manifestation,
        pacs_ae_title="DEMOPACS",
        pacs_host="127.0.0.1",
        pacs_port=pacs_port,
    )
    url = settings.resolved_database_url
    migrate.upgrade(url)
    console.print(f"data dir: {run_dir}", soft_wrap=True)

    if input_dir is not None:
        paths = dicom_files(input_dir)
        if not paths:
            console.print(f"[red]error:[/red] no DICOM files under {input_dir}")
            return 2
        source = f"{len(paths)} DICOM files from {input_dir}"
    else:
        from ctdx.model_train.phantom import write_phantom_series

        with console.status("generating a synthetic chest CT phantom (COVID-19 pattern)…"):
            study = write_phantom_series(Path(tempfile.mkdtemp(dir=run_dir)), "covid19",
                                         n_slices=60, size=512, seed=7)
        paths = list(study.paths)
        source = "a synthetic 60-slice chest CT phantom with a COVID-19-like pattern"
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    study_uid = str(first.StudyInstanceUID)
    meaningless = models.synthetic and not is_phantom(first)

    engine = make_engine(url)
    pacs = StandInPacs(run_dir / "pacs", settings.pacs_ae_title, pacs_port).start()
    try:
        with ScpService(settings, engine), worker_process(settings, run_dir / "worker.log") as proc:
            def worker_alive() -> str | None:
                if proc.poll() is not None:
                    tail = (run_dir / "worker.log").read_text(errors="replace")[-2000:]
                    return f"the worker stopped (exit {proc.returncode}):\n{tail}"
                return None

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          console=console, transient=False) as progress:
                console.print(f"sending {source}")
                task = progress.add_task("C-STORE to ctdx scp", total=len(paths))
                failures = send_study(paths, "127.0.0.1", scp_port, settings.ae_title,
                                      lambda n: progress.update(task, completed=n))
            if failures:
                console.print(f"[yellow]{failures} instance(s) were not accepted[/yellow]")

            def state() -> str | None:
                with session_scope(engine) as s:
                    row = s.execute(
                        select(StudyVersion.state).join(Study)
                        .where(Study.study_instance_uid == study_uid)
                        .order_by(StudyVersion.version.desc())
                    ).first()
                    return None if row is None else str(row[0])

            sop_classes: dict[Path, str] = {}  # each received file's header is read once

            def sr_arrived() -> list[Path]:
                for p in pacs.received():
                    if p not in sop_classes:
                        header = pydicom.dcmread(p, stop_before_pixels=True)
                        sop_classes[p] = str(header.SOPClassUID)
                return [p for p, uid in sop_classes.items()
                        if uid.startswith(SR_SOP_CLASS_PREFIX)]

            with console.status("waiting…") as status:
                last = None
                deadline = time.monotonic() + timeout
                while not sr_arrived():
                    current = state()
                    if current != last:
                        console.print(f"  study version: [bold]{current}[/bold]")
                        last = current
                    status.update(f"study {current}: waiting for the SR at the stand-in PACS…")
                    if current == "failed":
                        break
                    problem = worker_alive()
                    if problem:
                        raise RuntimeError(problem)
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no SR after {timeout:.0f} s (study is {current})")
                    time.sleep(0.2)
                final = state()
                if final != last:
                    console.print(f"  study version: [bold]{final}[/bold]")
    finally:
        pacs.stop()

    with session_scope(engine) as s:
        analysis = s.scalars(select(Analysis).order_by(Analysis.id.desc())).first()
        if analysis is None or analysis.decision is None:
            reason = analysis.failure_reason if analysis is not None else "no analysis"
            console.print(f"[red]the study could not be analysed:[/red] {reason}")
            return 1
        console.rule("[bold]result")
        warning = f" [bold red]({MEANINGLESS})[/bold red]" if meaningless else ""
        console.print(
            f"decision: [bold]{analysis.decision}[/bold]{warning}\n"
            f"COVID-19 slices {100 * (analysis.fraction_covid19 or 0):.1f}% "
            f"(threshold {100 * (analysis.threshold or 0):.0f}%), "
            f"other pneumonia {100 * (analysis.fraction_other_pneumonia or 0):.1f}%, "
            f"normal {100 * (analysis.fraction_normal or 0):.1f}%\n"
            f"slices: {analysis.slices_analysed} analysed, {analysis.slices_skipped} skipped "
            f"of {analysis.slices_total}; model {analysis.model_name} {analysis.model_version} "
            f"on {analysis.device}"
        )
    engine.dispose()
    srs = sr_arrived()
    console.rule("[bold]SR received by the stand-in PACS")
    console.print(sr_tree(pydicom.dcmread(srs[0])))
    console.rule("[bold]ctdx results list")
    from ctdx.db import cli as db_cli

    app = typer.Typer()
    db_cli.register(app)
    try:
        app(["results", "list", "--database-url", url, "--limit", "1"], standalone_mode=False)
    except SystemExit:
        pass
    if meaningless:
        console.print(f"[bold red]The call above {MEANINGLESS}.[/bold red] Set CTDX_MODEL to a "
                      "model trained on real data (`ctdx train`) for a meaningful call.")
    console.print(f"\ndone in {time.monotonic() - started:.0f} s. Explore further with:")
    # one unwrapped line, quoted for the shell: pasteable as it is
    hint = " ".join(shlex.quote(w) for w in (
        f"CTDX_DATABASE_URL={url}", ctdx_command(), "results", "show", study_uid))
    console.print(Text("  " + hint), soft_wrap=True)
    return 0


def prepare_models(base: Settings, cache_dir: Path) -> DemoModels:
    """:func:`demo_models`, with a progress line at least every 5 s while the demonstration
    model trains (plain lines: readable in a log and on a terminal alike)."""
    from ctdx.model_train.progress import ProgressLines

    if base.model is None:
        console.print("preparing the synthetic demonstration model (first run: trained)")
    with ProgressLines(lambda line: console.print(Text("  " + line), soft_wrap=True),
                       interval=5.0) as progress:
        progress.step("loading torch and the model code" if base.model is None
                      else "checking CTDX_MODEL")
        return demo_models(base, cache_dir, progress)


def demo_command(
    input_dir: Annotated[Path | None, typer.Option(
        "--input", exists=True, file_okay=False,
        help="Folder of real DICOM CT to send (e.g. ../shared/data/covid-ct-md/COVID-19/P001) "
        "instead of a synthetic phantom.",
    )] = None,
    data_dir: Annotated[Path, typer.Option(
        "--data-dir", help="Where the demo keeps its runs and its cached demonstration model.",
    )] = Path("ctdx-demo"),
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the SR.")
    ] = 300.0,
) -> None:
    """Run the whole product on this machine: listener, worker, stand-in PACS; send a study."""
    from ctdx.db.cli.common import UserError
    from ctdx.db.logs import configure_logging
    from ctdx.model_train.cpu import passive_omp_threads

    passive_omp_threads()
    configure_logging("WARNING")
    logging.getLogger("kombu").setLevel(logging.ERROR)  # filesystem transport has no hostname
    try:
        code = run_demo(input_dir, data_dir, timeout)
    except RuntimeError as exc:
        raise UserError(str(exc), code=1) from None
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)


