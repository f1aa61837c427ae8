"""Projects on disk: content-addressed photos, labels vs manual fixes, atomic writes."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from core.base.problems import InputError, Problem
from core.projects import workspace


def _file(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_create_list_rename_delete(workspace_home):
    a = workspace.create_project("Person in photo")
    b = workspace.create_project("Person in photo")
    assert a.slug == "person-in-photo" and b.slug == "person-in-photo-2"
    assert {p.slug for p in workspace.list_projects()} == {a.slug, b.slug}
    assert a.root.is_relative_to(workspace_home)
    a.rename("  Models   on photos ")
    assert workspace.open_project(a.slug).name == "Models on photos"
    workspace.delete_project(b.slug)
    assert [p.slug for p in workspace.list_projects()] == [a.slug]
    with pytest.raises(InputError, match="no project"):
        workspace.open_project(b.slug)


@pytest.mark.parametrize("bad", ["", "   "])
def test_create_rejects_empty_names(bad):
    with pytest.raises(InputError, match="name"):
        workspace.create_project(bad)


def test_open_refuses_path_tricks():
    with pytest.raises(InputError):
        workspace.open_project("../etc")


def test_images_are_stored_once_by_content(tmp_path):
    project = workspace.create_project("p")
    one = _file(tmp_path, "a.jpg", b"same bytes")
    sha, stored = project.add_image(one, name="a.jpg")
    sha2, stored2 = project.add_image(_file(tmp_path, "b.jpg", b"same bytes"), name="folder/b.jpg")
    assert sha == sha2 and stored and not stored2
    assert len(project.images()) == 1
    assert set(project.names()["name"]) == {"a.jpg", "folder/b.jpg"}
    assert project.image_path(sha).read_bytes() == b"same bytes"
    files = list((project.root / "images").rglob("*.jpg"))
    assert len(files) == 1 and files[0].name == f"{sha}.jpg"


def test_name_reuploaded_with_new_bytes_points_to_new_photo(tmp_path):
    project = workspace.create_project("p")
    old, _ = project.add_image(_file(tmp_path, "x1", b"old"), name="x.jpg")
    new, _ = project.add_image(_file(tmp_path, "x2", b"new"), name="x.jpg")
    assert old != new
    assert project.names().set_index("name").loc["x.jpg", "sha"] == new


def test_manual_fixes_win_over_sheet_and_survive_a_new_sheet(tmp_path):
    project = workspace.create_project("p")
    a, _ = project.add_image(_file(tmp_path, "a", b"a"), name="a.jpg")
    b, _ = project.add_image(_file(tmp_path, "b", b"b"), name="b.jpg")
    project.set_sheet_labels({"a.jpg": "person", "b.jpg": "no_person"})
    project.set_override(b, label="person")
    project.set_override(a, excluded=True)
    project.set_sheet_labels({"a.jpg": "no_person", "b.jpg": "no_person"})  # new sheet
    ds = project.dataset().set_index("sha")
    assert ds.loc[b, "label"] == "person" and ds.loc[b, "label_source"] == "manual"
    assert ds.loc[a, "label"] == "no_person" and ds.loc[a, "excluded"]
    assert list(project.training_set()["sha"]) == [b]


def test_two_names_with_conflicting_labels_leave_the_photo_unlabelled(tmp_path):
    project = workspace.create_project("p")
    project.add_image(_file(tmp_path, "a", b"a"), name="a.jpg")
    project.add_image(_file(tmp_path, "a2", b"a"), name="copy-of-a.jpg")
    project.set_sheet_labels({"a.jpg": "person", "copy-of-a.jpg": "no_person"})
    row = project.dataset().iloc[0]
    assert row["label"] == "" and row["label_source"] == "conflict"


def test_class_names_and_problems_roundtrip():
    project = workspace.create_project("p")
    project.set_class_names({"1": "Person in photo", "0": ""})
    assert project.class_names() == {"1": "Person in photo"}
    assert project.display("0") == "0"
    project.replace_problems("sheet", [Problem("missing_photo", "row 3: x.jpg was not uploaded", row=3, severity="warning")])
    project.replace_problems("up-1", [Problem("unreadable_image", "bad.jpg: truncated", file="bad.jpg")])
    project.replace_problems("sheet", [])
    problems = project.problems()
    assert list(problems["kind"]) == ["unreadable_image"]


def test_state_is_shared_between_two_handles_and_survives_reopen(tmp_path):
    first = workspace.create_project("shared")
    second = workspace.open_project(first.slug)  # e.g. a second browser tab
    first.set_meta("sheet", {"filename": "labels.csv"})
    assert second.get_meta("sheet") == {"filename": "labels.csv"}
    del first, second
    assert workspace.open_project("shared").get_meta("sheet")["filename"] == "labels.csv"


def test_concurrent_writers_do_not_lose_updates():
    project = workspace.create_project("busy")

    def writer(n):
        handle = workspace.open_project(project.slug)
        for i in range(25):
            handle.set_meta(f"w{n}-{i}", i)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert project.query("SELECT COUNT(*) FROM meta WHERE key LIKE 'w%'")[0][0] == 100
    con = sqlite3.connect(project.root / "project.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_cli_intake_of_the_shared_photos_as_a_zip(product_photos, tmp_path, capsys):
    """The issue's contract: 480 matched, 248 / 232 per class, the duplicate pair reported."""
    import json
    import zipfile

    from core import cli

    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for photo in sorted(product_photos.glob("*.jpg")):
            zf.write(photo, f"product-photos/{photo.name}")
    sheet = product_photos / "labels_parfois_style.csv"
    assert cli.main(["intake", "--images", str(archive), "--labels", str(sheet), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["matched"] == 480 and result["per_class"] == {"0": 232, "1": 248}
    assert result["unlabeled_images"] == 0 and result["missing_images"] == 0
    assert any("11108.jpg" in p["reason"] and "11109.jpg" in p["reason"] for p in result["problems"])


def test_cli_intake_refuses_an_unreadable_sheet_before_touching_photos(tmp_path, capsys):
    from core import cli

    (tmp_path / "a.jpg").write_bytes(b"not a photo")
    (tmp_path / "sheet.csv").write_bytes(b"")
    assert cli.main(["intake", "--images", str(tmp_path / "a.jpg"), "--labels", str(tmp_path / "sheet.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert workspace.list_projects() == []


def _create_in_process(name, home, start, out):
    import os

    os.environ["CATALOG_LENS_HOME"] = home
    start.wait(30)  # all six at the same moment
    try:
        out.put(("ok", workspace.create_project(name).slug))
    except Exception as exc:  # what the analyst would see
        out.put((type(exc).__name__, str(exc)))


def test_six_simultaneous_creates_of_one_name_each_get_a_project(workspace_home):
    """Six processes create "Summer shoes" at once (before: five crashed with FileExistsError)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    out, start = ctx.Queue(), ctx.Barrier(6)
    procs = [ctx.Process(target=_create_in_process, args=("Summer shoes", str(workspace_home), start, out))
             for _ in range(6)]
    for p in procs:
        p.start()
    answers = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert all(kind == "ok" for kind, _ in answers), answers
    slugs = sorted(slug for _, slug in answers)
    assert slugs == sorted(["summer-shoes"] + [f"summer-shoes-{n}" for n in range(2, 7)])
    assert sorted(p.slug for p in workspace.list_projects()) == slugs
    assert {workspace.open_project(s).name for s in slugs} == {"Summer shoes"}
    assert not [p for p in workspace.projects_dir().iterdir() if p.name.startswith(".")]  # no drafts left


def test_threads_creating_one_name_never_crash(workspace_home):
    barrier, errors, slugs = threading.Barrier(6), [], []

    def create():
        barrier.wait()
        try:
            slugs.append(workspace.create_project("Shoes").slug)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(set(slugs)) == 6



def test_a_create_landing_between_the_name_check_and_the_folder_gets_the_next_slug(workspace_home, monkeypatch):
    """The worst moment, made certain: another create of the same name completes right after
    this one found the name free (before: FileExistsError, the race the six processes hit)."""
    real, calls = workspace.projects_dir, []

    def projects_dir_with_a_competitor():
        calls.append(1)
        if len(calls) == 2:  # the name was found free; now someone else takes it
            monkeypatch.setattr(workspace, "projects_dir", real)
            assert workspace.create_project("Shoes").slug == "shoes"
        return real()

    monkeypatch.setattr(workspace, "projects_dir", projects_dir_with_a_competitor)
    mine = workspace.create_project("Shoes")
    assert mine.slug == "shoes-2" and mine.name == "Shoes"
    assert sorted(p.slug for p in workspace.list_projects()) == ["shoes", "shoes-2"]
