"""Data sources: where the training and validation documents come from, fetched or built once
into `cache_dir()/data/<source>/` and handed on as parquet files with a `text` column.

Sources (the validation file is pinned for each, so a score always means the same text):

- `climbmix`    upstream's default, the Hugging Face dataset karpathy/climbmix-400b-shuffle:
                `shard_{i:05d}.parquet`, shards 0..6542; validation is shard_06542, training
                shards 0..N-1 (N = `num_shards`, default 10, -1 for all 6542).
- `fineweb-edu` nanochat's pretraining set karpathy/fineweb-edu-100b-shuffle (FineWeb-Edu,
                shuffled, same layout): shards 0..1822; validation is shard_01822.
- `tinystories` karpathy/tinystories-gpt4-clean, one file `tinystories_gpt4_clean.parquet`
                (GPT-4 stories, low entropy: good for small GPUs). Split locally: the first
                10,000 rows are validation, the rest training shards of 250,000 rows.
- `local:PATH`  a folder of .parquet / .jsonl ("text" field) / .txt (documents separated by
                blank lines) files; the last file in sorted order is validation, or
                `local:PATH::NAME` names it. Other files are converted once to parquet in the cache.
- `builtin`     the offline corpus of `harness.data.corpus` (stdlib docstrings + pydoc topics).

Remote files come from `$HF_ENDPOINT` (default https://huggingface.co), so a mirror works, at one
commit of the dataset repository: the source's `revision` when it names one, else the commit `main`
points to at the first download, asked of the Hub API once and recorded in the source's cache
folder (`revision.json`), so every later shard, and a validation shard fetched again, come from
that same commit. The Hugging Face conventions hold: `HF_TOKEN` (else the token `hf auth login`
saved) is sent, and `HF_HUB_OFFLINE=1` uses the cache only. Concurrent setups of one source take
turns (a lock beside its cache folder): the second waits, then reuses what the first fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from harness.data.download import (DownloadError, DownloadJob, InvalidFile, download_files, exclusive_lock,
                                   fetch_json, validate_parquet)
from harness.files import atomic_write_text
from harness.paths import cache_dir

DEFAULT_ENDPOINT = "https://huggingface.co"
LOCAL_PREFIX = "local:"
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".txt")
CONVERTED_MANIFEST = "converted.json"
REVISION_FILE = "revision.json"
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # as huggingface_hub reads HF_HUB_OFFLINE
WRITE_BATCH = 1024  # documents per parquet row group when converting


@dataclass(frozen=True)
class DataSplit:
    """The files a source resolved to: training shards in order, and the pinned validation file."""

    source: str
    directory: Path
    train_files: list[Path]
    val_file: Path
    revision: str | None = None  # the dataset commit of a Hub source (None: not from the Hub)


@dataclass(frozen=True)
class ShardedHubSource:
    """A Hugging Face dataset of numbered shards, the last one pinned as validation."""

    repo: str
    max_shard: int  # the last shard's index; it is the validation shard
    default_shards: int = 10
    pattern: str = "shard_{:05d}.parquet"
    revision: str | None = None  # a commit of the dataset; None: `main`'s at the first download

    def train_names(self, num_shards: int | None) -> list[str]:
        count = self.default_shards if num_shards is None else num_shards
        count = self.max_shard if count == -1 else min(count, self.max_shard)
        return [self.pattern.format(i) for i in range(count)]

    @property
    def val_name(self) -> str:
        return self.pattern.format(self.max_shard)


@dataclass(frozen=True)
class SingleFileHubSource:
    """A Hugging Face dataset in one parquet file, split here: the first `val_rows` rows are
    validation, the rest training shards of `rows_per_shard` rows."""

    repo: str
    filename: str
    val_rows: int = 10_000
    rows_per_shard: int = 250_000
    revision: str | None = None  # as ShardedHubSource.revision


HUB_SOURCES: dict[str, ShardedHubSource | SingleFileHubSource] = {
    "climbmix": ShardedHubSource("karpathy/climbmix-400b-shuffle", max_shard=6542),
    "fineweb-edu": ShardedHubSource("karpathy/fineweb-edu-100b-shuffle", max_shard=1822),
    "tinystories": SingleFileHubSource("karpathy/tinystories-gpt4-clean", "tinystories_gpt4_clean.parquet"),
}

SOURCES: dict[str, str] = {
    "climbmix": "karpathy/climbmix-400b-shuffle (upstream's default; 6542 training shards, val shard_06542)",
    "fineweb-edu": "karpathy/fineweb-edu-100b-shuffle (1822 training shards, val shard_01822)",
    "tinystories": "karpathy/tinystories-gpt4-clean (one file; first 10,000 stories are validation)",
    "builtin": "offline: standard-library docstrings and pydoc topics of this Python (~1.8 MB)",
    "local:PATH": "a folder of .parquet/.jsonl/.txt files; last file (or local:PATH::NAME) is validation",
}


def hub_endpoint() -> str:
    """`HF_ENDPOINT` (read at call time: a mirror), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT).rstrip("/")


def hub_url(repo: str, filename: str, revision: str = "main") -> str:
    """Download address of a dataset file at `revision` (a commit, or a branch such as main)."""
    return f"{hub_endpoint()}/datasets/{repo}/resolve/{quote(revision, safe='')}/{filename}"


def hub_token() -> str | None:
    """The Hugging Face token as huggingface_hub finds it: `HF_TOKEN` (or the older
    `HUGGING_FACE_HUB_TOKEN`), else the file `hf auth login` writes (`HF_TOKEN_PATH`, else
    `$HF_HOME/token`, else ~/.cache/huggingface/token)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "huggingface")
    path = Path(os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token")).expanduser()
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` is set to a true value: use the cache, request nothing."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in TRUE_VALUES


def hub_revision(repo: str, directory: Path, pinned: str | None, offline: bool, token: str | None,
                 progress: bool) -> str:
    """The commit to download `repo` at: `pinned`, else the one recorded in `directory`, else
    the commit `main` points to now (asked of the Hub API, then recorded). A server without the
    API (some mirrors) leaves `main`, unpinned, and says so."""
    if pinned:
        return pinned
    record = directory / REVISION_FILE
    try:
        saved = json.loads(record.read_text())
        if saved.get("repo") == repo and saved.get("revision"):
            return str(saved["revision"])
    except (OSError, ValueError, AttributeError):
        pass
    if offline:
        return "main"  # nothing will be requested: only files already in the cache are used
    api = f"{hub_endpoint()}/api/datasets/{repo}/revision/main"
    try:
        answer = fetch_json(api, token=token)
    except DownloadError as exc:
        if not exc.reason.startswith("HTTP 4"):
            raise  # the network is down or the server fails: the downloads would fail too
        _say(progress, f"data: warning: could not look up the commit of {repo}'s main branch ({exc.reason} "
                       f"from {api}); downloading from main, not pinned")
        return "main"
    sha = answer.get("sha") if isinstance(answer, dict) else None
    if not isinstance(sha, str) or not sha:
        raise DownloadError(api, "the answer names no commit (no \"sha\")", "Check HF_ENDPOINT.")
    _write_json(record, {"repo": repo, "revision": sha, "resolved_from": "main"})
    _say(progress, f"data: {repo} pinned to commit {sha} (recorded in {record})")
    return sha


def _unknown_source(source: str) -> ValueError:
    return ValueError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)} "
                      f"(e.g. local:~/corpus or local:~/corpus::valid.jsonl)")


def source_directory(source: str, cache: Path | None = None) -> Path:
    """The cache folder of a source: `data/<name>/`, `data/local-<hash of the folder>/` for local."""
    root = (cache or cache_dir()) / "data"
    if source.startswith(LOCAL_PREFIX):
        folder, _ = _parse_local(source)
        return root / f"local-{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}"
    if source in HUB_SOURCES or source == "builtin":
        return root / source
    raise _unknown_source(source)


def prepare_data(source: str, num_shards: int | None = None, workers: int = 8,
                 cache: Path | None = None, progress: bool = True) -> DataSplit:
    """Fetch or build `source` (idempotent: valid files are reused, partial ones resumed) and
    return its files. `num_shards` limits the training shards (None: the source's default;
    -1: all); raises ValueError for an unknown source, DownloadError when a remote is unreachable."""
    source = source.strip()
    if num_shards is not None and num_shards != -1 and num_shards < 1:
        raise ValueError(f"num_shards must be a positive number of shards or -1 for all, got {num_shards}")
    directory = source_directory(source, cache)
    lock = directory.with_name(directory.name + ".lock")
    with exclusive_lock(lock, on_wait=lambda: _say(progress, f"data: waiting for another process that "
                                                             f"prepares {source} (it holds {lock})")):
        if source == "builtin":
            split = _prepare_builtin(directory, progress)
        elif source.startswith(LOCAL_PREFIX):
            split = _prepare_local(source, directory, progress)
        else:
            spec = HUB_SOURCES[source]
            if isinstance(spec, ShardedHubSource):
                split = _prepare_sharded(source, spec, directory, num_shards, workers, progress)
            else:
                split = _prepare_single_file(source, spec, directory, workers, progress)
    if num_shards not in (None, -1):
        split = DataSplit(split.source, split.directory, split.train_files[:num_shards], split.val_file,
                          split.revision)
    return split


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


# -- remote sources -------------------------------------------------------------------------------

def _prepare_sharded(source: str, spec: ShardedHubSource, directory: Path, num_shards: int | None,
                     workers: int, progress: bool) -> DataSplit:
    names = [*spec.train_names(num_shards), spec.val_name]
    offline, token = hub_offline(), hub_token()
    if not offline and all(_valid(directory / name) for name in names):
        offline = True  # all there: no need to ask the Hub anything
    revision = hub_revision(spec.repo, directory, spec.revision, offline, token, progress)
    jobs = [DownloadJob(hub_url(spec.repo, name, revision), directory / name) for name in names]
    paths = download_files(jobs, workers=workers, progress=progress, token=token, offline=offline)
    return DataSplit(source, directory, paths[:-1], paths[-1], revision)


def _prepare_single_file(source: str, spec: SingleFileHubSource, directory: Path, workers: int,
                         progress: bool) -> DataSplit:
    manifest = directory / "split.json"
    offline, token = hub_offline(), hub_token()
    try:
        split = _load_split(source, directory, manifest)
        return DataSplit(split.source, split.directory, split.train_files, split.val_file,
                         hub_revision(spec.repo, directory, spec.revision, True, token, progress))
    except (OSError, ValueError):
        pass
    raw = directory / "download" / spec.filename
    revision = hub_revision(spec.repo, directory, spec.revision, offline or _valid(raw), token, progress)
    download_files([DownloadJob(hub_url(spec.repo, spec.filename, revision), raw)], workers=workers,
                   progress=progress, token=token, offline=offline)
    _say(progress, f"data: splitting {spec.filename} into validation ({spec.val_rows:,} rows) and training shards")
    split = _split_single_file(source, spec, raw, directory, manifest)
    return DataSplit(split.source, split.directory, split.train_files, split.val_file, revision)


def _split_single_file(source: str, spec: SingleFileHubSource, raw: Path, directory: Path,
                       manifest: Path) -> DataSplit:
    import pyarrow.parquet as pq

    manifest.unlink(missing_ok=True)  # written last: its presence marks a complete split
    val_file = directory / "val.parquet"
    train_files: list[Path] = []
    writer = _ShardWriter(val_file)
    rows = 0
    for batch in pq.ParquetFile(raw).iter_batches(batch_size=WRITE_BATCH, columns=["text"]):
        texts = batch.column(0).to_pylist()
        while texts:
            if rows < spec.val_rows:
                room = spec.val_rows - rows
            else:
                room = spec.rows_per_shard - (rows - spec.val_rows) % spec.rows_per_shard
                if room == spec.rows_per_shard:  # a new training shard begins
                    writer.close()
                    writer = _ShardWriter(directory / f"train_{len(train_files):05d}.parquet")
                    train_files.append(writer.path)
            writer.write(texts[:room])
            rows += len(texts[:room])
            texts = texts[room:]
    writer.close()
    if not train_files:
        raise InvalidFile(f"{raw} has only {rows} rows; more than {spec.val_rows} are needed "
                          f"(the first {spec.val_rows} are validation). Delete it to download it again.")
    _write_json(manifest, {"train_files": [p.name for p in train_files], "val_file": val_file.name})
    return DataSplit(source, directory, train_files, val_file)


def _load_split(source: str, directory: Path, manifest: Path) -> DataSplit:
    saved = json.loads(manifest.read_text())
    try:
        train_files = [directory / name for name in saved["train_files"]]
        val_file = directory / saved["val_file"]
    except (KeyError, TypeError) as exc:
        raise InvalidFile(f"{manifest} is incomplete ({exc})") from exc
    for path in (*train_files, val_file):
        validate_parquet(path)
    return DataSplit(source, directory, train_files, val_file)


# -- builtin ---------------------------------------------------------------------------------------

def _prepare_builtin(directory: Path, progress: bool) -> DataSplit:
    from harness.data.corpus import build_builtin_corpus, load_builtin_corpus

    try:
        corpus = load_builtin_corpus(directory)
    except (OSError, ValueError):
        _say(progress, "data: building the builtin corpus from this Python's standard library docs")
        corpus = build_builtin_corpus(directory)
    return DataSplit("builtin", directory, corpus.train_files, corpus.val_file)


# -- local folders ----------------------------------------------------------------------------------

def _parse_local(source: str) -> tuple[Path, str | None]:
    spec = source[len(LOCAL_PREFIX):]
    path, sep, val_name = spec.partition("::")
    if not path:
        raise ValueError(f"{source!r} names no folder; write local:PATH or local:PATH::VALIDATION_FILE")
    return Path(path).expanduser().resolve(), (val_name or None) if sep else None


def _prepare_local(source: str, directory: Path, progress: bool) -> DataSplit:
    folder, val_name = _parse_local(source)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise ValueError(f"{source}: {folder} {what}; local:PATH needs a folder holding at least two "
                         f"{'/'.join(LOCAL_SUFFIXES)} files (training and validation)")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in LOCAL_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"{source}: {folder} holds {len(files)} {'/'.join(LOCAL_SUFFIXES)} file(s); at least "
                         f"two are needed (training and validation)")
    if val_name is None:
        val_source = files[-1]
    else:
        matches = [p for p in files if p.name == val_name]
        if not matches:
            raise ValueError(f"{source}: no validation file {val_name!r} in {folder}; "
                             f"files there: {', '.join(p.name for p in files)}")
        val_source = matches[0]
    directory.mkdir(parents=True, exist_ok=True)
    converted = _as_parquet(files, directory, progress)
    train_files = [converted[p] for p in files if p != val_source]
    return DataSplit(source, directory, train_files, converted[val_source])


def _as_parquet(files: list[Path], directory: Path, progress: bool) -> dict[Path, Path]:
    """Each file as parquet: parquet files as they are (validated), others converted once into
    `directory` (again when the source file changes)."""
    manifest_path = directory / CONVERTED_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    result = {}
    for path in files:
        if path.suffix.lower() == ".parquet":
            validate_parquet(path)
            result[path] = path
            continue
        out = directory / f"{path.name}.parquet"
        stat = path.stat()
        stamp = {"source": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if manifest.get(out.name) != stamp or not _valid(out):
            _say(progress, f"data: converting {path} to parquet")
            documents = _jsonl_documents(path) if path.suffix.lower() == ".jsonl" else _txt_documents(path)
            try:
                written = _write_documents(documents, out)
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path} is not UTF-8 text ({exc}); re-encode it as UTF-8") from exc
            if written == 0:
                out.unlink(missing_ok=True)
                raise ValueError(f"{path} holds no documents")
            manifest[out.name] = stamp
            _write_json(manifest_path, manifest)
        result[path] = out
    return result


def _valid(path: Path) -> bool:
    try:
        validate_parquet(path)
        return True
    except InvalidFile:
        return False


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: each line must be a JSON object with a string "
                                 f"\"text\" field")
            if text:
                yield text


def _txt_documents(path: Path) -> Iterator[str]:
    """Documents are runs of non-blank lines; one or more blank lines separate them."""
    lines: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\n")
                lines = []
    if lines:
        yield "".join(lines).rstrip("\n")


class _ShardWriter:
    """Appends row groups of documents to a parquet file under a temporary name; `close()`
    renames it into place, so a file with the final name is always complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self._tmp = path.with_name(path.name + ".tmp")
        self._writer = None

    def write(self, texts: list[str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not texts:
            return
        table = pa.table({"text": pa.array(texts, pa.string())})
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, table.schema)
        self._writer.write_table(table)
        self.rows += len(texts)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._tmp.unlink(missing_ok=True)


def _write_documents(documents: Iterator[str], path: Path) -> int:
    writer = _ShardWriter(path)
    batch: list[str] = []
    try:
        for text in documents:
            batch.append(text)
            if len(batch) == WRITE_BATCH:
                writer.write(batch)
                batch = []
        writer.write(batch)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return writer.rows


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
