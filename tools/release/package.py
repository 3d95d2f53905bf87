"""Package bundles as self-contained, reproducible MONAI Model Zoo zips, with the zoo's ``model_info.json`` index.

For every bundle folder ``bundles/<name>`` (or the ones given with ``--bundles``) this writes
``dist/<name>_v<version>.zip``: a top folder ``<name>/`` holding the bundle (configs/, models/, docs/, LICENSE,
large_files.yml, ...) and, in place of the repository's ``common`` link, a real copy of the modules of the shared
``common/`` package that its configs use (those they name and what those import), with ``common/VENDORED.json``
recording the version of ``common`` and the modules carried, so an extracted bundle imports nothing from this
repository. Left out: ``runs/``, ``data/``,
``output/``, ``__pycache__``, hidden files and whatever git ignores; a bundle whose folder (or the shared package)
holds files that git neither tracks nor ignores is refused, so a release holds only what was committed. Files listed in ``large_files.yml`` go
into the zip when they exist locally (their hash is checked first); the others stay listed for
``python -m monai.bundle download_large_files``.

The zip is the same byte for byte when built twice from the same tree: entries sorted, fixed timestamps
(1980-01-01) and permissions (0644 files, 0755 folders), zlib's default compression level.

``dist/model_info.json`` indexes every ``<name>_v<version>.zip`` in ``dist/`` in the zoo's shape::

    {"brain_t1_ldm_v0.1.0": {"checksum": "<sha256 of the zip>", "source": "<base_url>/brain_t1_ldm_v0.1.0.zip"}}

A bundle whose metadata ``version`` has no ``changelog`` entry is refused. Usage (from the repository root)::

    package-bundles [--bundles brain_t1_ldm,other] [--output_dir dist] [--base_url URL]
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.io.atomic import atomic_path, write_json
from common.networks.pairing import unpaired_weights
from tools.release.large_files import file_digest, read_large_files

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Where the published zips live: ``source`` of the index is ``<base_url>/<name>_v<version>.zip``. Placeholder
#: until the project's release location is fixed; pass ``--base_url`` for a real one.
DEFAULT_BASE_URL = "https://github.com/monai-generative-bundles/bundles/releases/download/hosting_storage_v1"
INDEX_NAME = "model_info.json"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
#: Folders of a bundle's top level that are never packaged (training runs, local data, inference outputs).
EXCLUDED_TOP_DIRS = frozenset({"runs", "data", "output", "demo_output"})
EXCLUDED_DIRS = frozenset({"__pycache__", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints"})
EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".tmp")


class PackagingError(ValueError):
    """A bundle cannot be packaged; the message names the bundle and the fix."""


def parse_names(names: str | Sequence[str] | None) -> list[str] | None:
    """``"a,b"`` or ``("a", "b")`` (what fire makes of ``--bundles a,b``) -> ``["a", "b"]``; ``None`` stays ``None``."""
    if names is None:
        return None
    items = names.split(",") if isinstance(names, str) else [str(n) for n in names]
    return [n.strip() for n in items if n.strip()]


def discover_bundles(bundles_dir: str | Path, names: Sequence[str] | None = None) -> list[Path]:
    """Bundle folders (those with ``configs/metadata.json``) under ``bundles_dir``, sorted; ``names`` restricts."""
    bundles_dir = Path(bundles_dir)
    found = {p.parent.parent.name: p.parent.parent for p in bundles_dir.glob("*/configs/metadata.json")}
    if names is None:
        return [found[n] for n in sorted(found)]
    unknown = [n for n in names if n not in found]
    if unknown:
        raise PackagingError(f"no bundle named {unknown} in {bundles_dir} (bundles: {', '.join(sorted(found))})")
    return [found[n] for n in names]


class GitIgnored:
    """Which paths git ignores, asked of the git work tree holding them (nothing is ignored outside one)."""

    def __init__(self, folder: Path) -> None:
        done = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=False
        )
        self.root = Path(done.stdout.strip()).resolve() if done.returncode == 0 else None

    def filter(self, paths: Iterable[Path]) -> set[Path]:
        """The subset of ``paths`` (absolute, inside the work tree) that git ignores; tracked files never are."""
        paths = [p for p in paths if self.root is not None and p.is_relative_to(self.root)]
        if not paths:
            return set()
        query = "\0".join(str(p.relative_to(self.root)) for p in paths) + "\0"
        done = subprocess.run(
            ["git", "-C", str(self.root), "check-ignore", "-z", "--stdin"],
            input=query.encode(),
            capture_output=True,
            check=False,
        )
        if done.returncode not in (0, 1):  # 1: nothing ignored
            raise PackagingError(f"git check-ignore failed in {self.root}: {done.stderr.decode().strip()}")
        return {self.root / name for name in done.stdout.decode().split("\0") if name}

    def untracked(self, folder: Path) -> list[Path]:
        """Files under ``folder`` that git neither tracks nor ignores (stray outputs, notes), sorted."""
        if self.root is None or not folder.resolve().is_relative_to(self.root):
            return []
        done = subprocess.run(
            [
                "git",
                "-C",
                str(self.root),
                "ls-files",
                "--others",
                "--exclude-standard",
                "-z",
                "--",
                str(folder.resolve()),
            ],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            raise PackagingError(f"git ls-files failed in {self.root}: {done.stderr.decode().strip()}")
        return sorted(self.root / name for name in done.stdout.decode().split("\0") if name)


def _walk_files(folder: Path, top_level_excluded: frozenset[str] = frozenset()) -> list[Path]:
    """Files under ``folder`` (links followed), without excluded folders, hidden entries and bytecode."""
    files = []
    for current, dirs, names in os.walk(folder, followlinks=True):
        at_top = Path(current) == folder
        dirs[:] = [
            d
            for d in dirs
            if d not in EXCLUDED_DIRS and not d.startswith(".") and not (at_top and d in top_level_excluded)
        ]
        files += [Path(current) / n for n in names if not n.startswith(".") and not n.endswith(EXCLUDED_SUFFIXES)]
    return files


def _not_ignored(files: list[Path], folder: Path) -> list[Path]:
    """``files`` (found under ``folder``) minus those ignored by the git work tree that holds ``folder``."""
    ignored = GitIgnored(folder).filter(f.resolve() for f in files)
    return [f for f in files if f.resolve() not in ignored]


@dataclass(frozen=True)
class BundleSource:
    """The files of one bundle folder that go into its zip, with their names inside the zip."""

    folder: Path
    shared_package: Path

    @property
    def name(self) -> str:
        return self.folder.name

    def metadata(self) -> dict:
        path = self.folder / "configs" / "metadata.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise PackagingError(f"bundle {self.name}: cannot read {path}: {err}") from err

    def version(self) -> str:
        """The metadata ``version``, refused unless ``changelog`` has an entry for it."""
        meta = self.metadata()
        version, changelog = meta.get("version"), meta.get("changelog")
        where = self.folder / "configs" / "metadata.json"
        if not isinstance(version, str) or not version:
            raise PackagingError(f'bundle {self.name}: {where} has no `version`; add one, e.g. "version": "0.1.0".')
        if not isinstance(changelog, dict) or version not in changelog:
            raise PackagingError(
                f"bundle {self.name}: version {version!r} has no entry in the `changelog` of {where}; add "
                f'"{version}": "<what changed>" to `changelog` (or set `version` to a released one) before packaging.'
            )
        if meta.get("name", self.name) != self.name:
            raise PackagingError(
                f"bundle {self.name}: metadata `name` is {meta.get('name')!r}; it must equal the folder name "
                f"{self.name!r} (the zip's top folder and the name `monai.bundle download` uses)."
            )
        return version

    def large_files(self) -> tuple[list[Path], list[str]]:
        """(local files listed in large_files.yml, hash-checked; paths of the entries not available locally)."""
        try:
            entries = read_large_files(self.folder)
        except ValueError as err:
            raise PackagingError(f"bundle {self.name}: {err}") from err
        present, absent = [], []
        for entry in entries:
            path = entry.local_path(self.folder)
            if not path.exists():
                absent.append(entry.path)
                continue
            if problem := entry.check(self.folder):
                raise PackagingError(f"bundle {self.name}: large file {problem}")
            present += [path] if path.is_file() else _walk_files(path)
        return present, absent

    def entries(self) -> dict[str, Path]:
        """``{name inside the zip: file}`` for the bundle, its local large files and the vendored shared package."""
        top = self.name
        own = [  # the bundle's `common` link to the repository's package is replaced by a copy, below
            f
            for f in _walk_files(self.folder, EXCLUDED_TOP_DIRS | {"common"})
            if f.relative_to(self.folder).parts[0] != "common"
        ]
        large, _ = self.large_files()
        entries = {f"{top}/{f.relative_to(self.folder).as_posix()}": f for f in _not_ignored(own, self.folder)}
        entries.update({f"{top}/{f.relative_to(self.folder).as_posix()}": f for f in large})
        used = set(SharedModules(self.shared_package).needed_by(self.folder / "configs"))
        shared = [f for f in _not_ignored(_walk_files(self.shared_package), self.shared_package) if f.resolve() in used]
        entries.update({f"{top}/common/{f.relative_to(self.shared_package).as_posix()}": f for f in shared})
        return entries

    def vendored_record(self) -> bytes:
        """``common/VENDORED.json`` of the zip: the version of ``common`` it carries and which of its modules."""
        modules = SharedModules(self.shared_package)
        files = sorted(modules.needed_by(self.folder / "configs"))
        record = {
            "package": "common",
            "version": modules.version(),
            "modules": [modules.module_name(f) for f in files],
        }
        return (json.dumps(record, indent=2) + "\n").encode()


class SharedModules:
    """The modules of the shared package that a bundle's configs need: those they name, and what those import."""

    def __init__(self, package: Path) -> None:
        self.package = package.resolve()
        self.name = self.package.name

    def module_name(self, path: Path) -> str:
        parts = path.resolve().relative_to(self.package.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def _file(self, dotted: str) -> Path | None:
        """The file of module ``dotted`` (``common.x.y``), or ``None`` (an attribute, not a module)."""
        parts = dotted.split(".")[1:]
        if not parts:
            return (self.package / "__init__.py").resolve()
        rel = Path(*parts)
        for candidate in (self.package / rel / "__init__.py", self.package / rel.with_suffix(".py")):
            if candidate.is_file():
                return candidate.resolve()
        return None

    def _longest_module(self, dotted: str) -> Path | None:
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if (found := self._file(".".join(parts[:end]))) is not None:
                return found
        return None

    def _imports(self, path: Path) -> set[Path]:
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                if name == self.name or name.startswith(self.name + "."):
                    if (module := self._longest_module(name)) is not None:
                        found.add(module)
        return found

    def needed_by(self, configs: Path) -> set[Path]:
        """Files of every module the JSON configs in ``configs`` name, their imports, and their packages."""
        pattern = re.compile(rf"\b{re.escape(self.name)}(?:\.[A-Za-z_]\w*)+")
        todo = {self.package / "__init__.py"}
        for config in sorted(configs.glob("*.json")):
            for dotted in pattern.findall(config.read_text(encoding="utf-8")):
                if (module := self._longest_module(dotted)) is not None:
                    todo.add(module)
        needed: set[Path] = set()
        while todo:
            path = todo.pop()
            if path in needed:
                continue
            needed.add(path)
            todo |= self._imports(path)
            for parent in path.parents:  # importing a.b.c runs a/__init__ and a/b/__init__
                if parent == self.package.parent:
                    break
                if (init := parent / "__init__.py").is_file() and init not in needed:
                    todo.add(init.resolve())
        return needed

    def version(self) -> str:
        text = (self.package / "__init__.py").read_text(encoding="utf-8")
        match = re.search(r"^__version__ = [\"']([^\"']+)[\"']", text, re.M)
        return match.group(1) if match else "unknown"


class ReproducibleZip:
    """Writes ``{name: file}`` into a zip whose bytes depend only on the names and file contents."""

    @staticmethod
    def _folders(names: Iterable[str]) -> set[str]:
        folders = set()
        for name in names:
            parts = name.split("/")[:-1]
            folders |= {"/".join(parts[: i + 1]) + "/" for i in range(len(parts))}
        return folders

    @staticmethod
    def _info(name: str) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
        info.create_system = 3  # unix, so that the permission bits below are honoured
        if name.endswith("/"):
            info.external_attr = (0o40755 << 16) | 0x10
        else:
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED  # zlib's default level: the same bytes for the same zlib
        return info

    def write(self, path: Path, entries: dict[str, Path], extra: dict[str, bytes] | None = None) -> None:
        """Write the zip to ``path`` atomically (a temporary name renamed on success); files are streamed.

        ``extra`` holds generated files, ``{name: bytes}``.
        """
        extra = dict(extra or {})
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
            for name in sorted(self._folders([*entries, *extra]) | set(entries) | set(extra)):
                info = self._info(name)
                if name.endswith("/"):
                    archive.writestr(info, b"")
                    continue
                if name in extra:
                    archive.writestr(info, extra[name])
                    continue
                info.file_size = entries[name].stat().st_size  # lets zipfile pick zip64 for files over 2 GiB
                with open(entries[name], "rb") as src, archive.open(info, "w") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)


class ModelIndex:
    """``model_info.json`` of a folder of zips: ``{"<name>_v<version>": {"checksum": sha256, "source": url}}``."""

    def __init__(self, folder: Path, base_url: str) -> None:
        self.folder = folder
        self.base_url = base_url.rstrip("/")

    def build(self) -> dict[str, dict[str, str]]:
        index = {}
        for zip_path in sorted(self.folder.glob("*_v*.zip")):
            index[zip_path.stem] = {"checksum": file_digest(zip_path), "source": f"{self.base_url}/{zip_path.name}"}
        return index

    def write(self) -> Path:
        path = self.folder / INDEX_NAME
        write_json(path, self.build())
        return path


@dataclass(frozen=True)
class PackagedBundle:
    name: str
    version: str
    path: Path
    size: int
    sha256: str
    not_included: tuple[str, ...]


def package_bundle(folder: Path, output_dir: Path, shared_package: Path = REPO_ROOT / "common") -> PackagedBundle:
    """Write ``output_dir/<name>_v<version>.zip`` for the bundle in ``folder``; raise ``PackagingError`` if refused."""
    source = BundleSource(Path(folder).resolve(), Path(shared_package).resolve())
    version = source.version()
    if not (source.shared_package / "__init__.py").is_file():
        raise PackagingError(f"bundle {source.name}: shared package {source.shared_package} has no __init__.py")
    entries = source.entries()
    _, absent = source.large_files()
    path = output_dir / f"{source.name}_v{version}.zip"
    ReproducibleZip().write(path, entries, {f"{source.name}/common/VENDORED.json": source.vendored_record()})
    return PackagedBundle(source.name, version, path, path.stat().st_size, file_digest(path), tuple(absent))


def package_bundles(
    bundles: str | Sequence[str] | None = None,
    bundles_dir: str = str(REPO_ROOT / "bundles"),
    output_dir: str = str(REPO_ROOT / "dist"),
    base_url: str = DEFAULT_BASE_URL,
    shared_package: str = str(REPO_ROOT / "common"),
) -> list[PackagedBundle]:
    """Package the bundles (all under ``bundles_dir`` unless ``bundles`` names some) and rewrite the index.

    Every bundle is checked before anything is written, so a refused bundle leaves ``output_dir`` untouched.
    """
    folders = discover_bundles(bundles_dir, parse_names(bundles))
    if not folders:
        raise PackagingError(f"no bundle (a folder with configs/metadata.json) under {bundles_dir}")
    for folder in folders:
        BundleSource(folder.resolve(), Path(shared_package).resolve()).version()
        if unpaired := unpaired_weights(folder / "models"):
            raise PackagingError(
                f"bundle {folder.name}: shipped weights do not belong together: {'; '.join(unpaired)}."
            )
        for part in (folder, Path(shared_package)):
            if stray := GitIgnored(part).untracked(part.resolve()):
                shown = ", ".join(str(p) for p in stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
                raise PackagingError(
                    f"bundle {folder.name}: {len(stray)} file(s) that git does not track would go into the release: "
                    f"{shown}. Commit them, delete them, or add them to .gitignore."
                )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for folder in folders:
        start = time.perf_counter()
        packaged = package_bundle(folder, out, Path(shared_package))
        done.append(packaged)
        print(
            f"{packaged.name} {packaged.version}: {packaged.path} ({packaged.size / 1e6:.1f} MB, "
            f"sha256 {packaged.sha256[:12]}..., {time.perf_counter() - start:.1f} s)"
        )
        for missing in packaged.not_included:
            print(f"  large file not available locally, left listed in large_files.yml: {missing}")
    print(f"index: {ModelIndex(out, base_url).write()}")
    return done


def main() -> None:
    import fire

    try:
        fire.Fire(package_bundles, name="package_bundles", serialize=lambda _: None)  # summary printed
    except PackagingError as error:
        print(f"package_bundles: error: {error}", file=sys.stderr)
        sys.exit(2)
