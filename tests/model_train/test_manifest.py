"""Manifest format: round trip, validation errors that name the problem, slice policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctdx.model_train.manifest import (
    COLUMNS,
    ManifestError,
    ManifestRow,
    apply_slice_policy,
    read_manifest,
    validate_rows,
    write_manifest,
)


def _files(tmp_path: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        p = tmp_path / "data" / f"{i}.dcm"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"")
        paths.append(p)
    return paths


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    f = _files(tmp_path, 3)
    rows = (
        ManifestRow("s1", "st1", f[0], "covid19", series="1.2.3",
                    manifestation="consolidation", slice_label=True),
        ManifestRow("s1", "st1", f[1], "covid19", slice_label=False),
        ManifestRow("s2", "st2", f[2], "normal", rotate=90, window=(-600.0, 1500.0),
                    pixel_spacing=0.7, cropped=True),
    )
    out = write_manifest(rows, tmp_path / "m.csv")
    assert out.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert "data/0.dcm" in out.read_text()  # relative to the manifest's folder
    back = read_manifest(out)
    assert back.rows == rows
    assert back.subject_class() == {"s1": "covid19", "s2": "normal"}
    summary = back.summary()
    assert summary["rows_per_class"] == {"covid19": 2, "other_pneumonia": 0, "normal": 1}
    assert summary["slice_labels"] == {"positive": 1, "negative": 1, "missing": 1}


@pytest.mark.parametrize(("text", "message"), [
    ("subject,study,path\ns,st,a.dcm\n", "missing column(s) class"),
    ("subject,study,path,class,colour\ns,st,a.dcm,normal,red\n", "unknown column(s) colour"),
    ("subject,study,path,class\ns,st,a.dcm,flu\n", "class 'flu' is not one of"),
    ("subject,study,path,class\n,st,a.dcm,normal\n", "column 'subject' is empty"),
    ("subject,study,path,class,manifestation\ns,st,a.dcm,normal,consolidation\n",
     "manifestation given on a 'normal' row"),
    ("subject,study,path,class,slice_label\ns,st,a.dcm,covid19,yes\n", "slice_label must be"),
    ("subject,study,path,class,rotate\ns,st,a.dcm,covid19,45\n", "rotate must be"),
    ("subject,study,path,class,window_center\ns,st,a.dcm,covid19,-600\n", "together"),
    ("subject,study,path,class\ns,st,missing.dcm,covid19\n", "does not exist"),
    ("subject,study,path,class\ns1,st,a.dcm,covid19\ns2,st,b.dcm,covid19\n",
     "appears under two subjects"),
    ("subject,study,path,class\ns,st,a.dcm,covid19\ns,st,b.dcm,normal\n",
     "has rows of class 'covid19' and 'normal'"),
    ("subject,study,path,class\ns,st,a.dcm,covid19\ns,st,a.dcm,covid19\n", "appears twice"),
])
def test_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    for name in ("a.dcm", "b.dcm"):
        (tmp_path / name).write_bytes(b"")
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(path)


def test_error_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"")
    path = tmp_path / "m.csv"
    path.write_text("subject,study,path,class\ns,st,a.dcm,normal\ns,st2,a2.dcm,normal\n")
    with pytest.raises(ManifestError, match=r"m.csv:3: path 'a2.dcm' does not exist"):
        read_manifest(path)


def test_lesion_only_policy_drops_negative_pneumonia_slices(tmp_path: Path) -> None:
    f = _files(tmp_path, 5)
    m = validate_rows([
        ManifestRow("c", "c1", f[0], "covid19", slice_label=True),
        ManifestRow("c", "c1", f[1], "covid19", slice_label=False),
        ManifestRow("p", "p1", f[2], "other_pneumonia", slice_label=False),
        ManifestRow("p", "p1", f[3], "other_pneumonia"),
        ManifestRow("n", "n1", f[4], "normal", slice_label=False),
    ])
    kept = apply_slice_policy(m, "lesion_only")
    assert [r.path for r in kept.rows] == [f[0], f[3], f[4]]
    assert apply_slice_policy(m, "all") == m
