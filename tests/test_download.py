"""The downloader against a real HTTP server on 127.0.0.1 that can cut connections, fail, ignore
Range headers and serve garbage, with parquet files generated here."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.data.sources import hub_revision, hub_token, hub_url, prepare_data
from harness.data.download import DownloadError, DownloadJob, download_files, validate_parquet

FAST = dict(backoff=0.001, timeout=5.0, progress=False)
PROJECT = Path(__file__).resolve().parent.parent


def parquet_bytes(rows: int, tag: str = "doc", row_group_size: int | None = None) -> bytes:
    texts = [f"{tag} {i}: the quick brown fox jumps over the lazy dog " * 3 for i in range(rows)]
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), sink, row_group_size=row_group_size)
    return sink.getvalue()


@dataclass
class Request:
    path: str
    range: str | None
    sent: int = 0
    authorization: str | None = None


@dataclass
class FileServer:
    """Serves `files` (URL path -> bytes). `script[path]` is a list of behaviours used up one per
    request: "ok", "cut" (half the bytes, then the connection closes), "ignore_range" (a full 200
    whatever Range says), "redirect:/other/path" (a 302 there, as the Hub sends to its CDN), or an
    HTTP status code to answer with. Missing paths answer 404."""

    files: dict[str, bytes] = field(default_factory=dict)
    script: dict[str, list] = field(default_factory=dict)
    delay: float = 0.0
    requests: list[Request] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def start(self) -> "FileServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                record = Request(self.path, self.headers.get("Range"), authorization=self.headers.get("Authorization"))
                with server.lock:
                    server.requests.append(record)
                    action = server.script.get(self.path, ["ok"])
                    action = action.pop(0) if len(action) > 1 else action[0]
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    self.respond(record, action)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def respond(self, record: Request, action):
                if isinstance(action, str) and action.startswith("redirect:"):
                    self.send_response(302)
                    self.send_header("Location", server.url + action.removeprefix("redirect:"))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    self.close_connection = True
                    return
                body = server.files.get(self.path)
                if isinstance(action, int) or body is None:
                    self.send_error(action if isinstance(action, int) else 404)
                    return
                start = 0
                if record.range and action != "ignore_range":
                    start = int(record.range.split("=")[1].split("-")[0])
                if start:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if action == "cut":
                    payload = payload[: len(payload) // 2]
                self.wfile.write(payload)
                record.sent = len(payload)
                self.wfile.flush()
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FileServer().start()
    yield srv
    srv.stop()


def test_plain_download_is_validated_and_renamed(server, tmp_path):
    body = parquet_bytes(200)
    server.files["/a.parquet"] = body
    dest = tmp_path / "a.parquet"
    assert download_files([(server.url + "/a.parquet", dest, validate_parquet)], **FAST) == [dest]
    assert dest.read_bytes() == body
    assert not (tmp_path / "a.parquet.tmp").exists()
    assert [r.range for r in server.requests] == [None]


def test_resume_after_a_cut_connection_uses_range(server, tmp_path):
    body = parquet_bytes(2000)
    server.files["/big.parquet"] = body
    server.script["/big.parquet"] = ["cut", "ok"]
    dest = tmp_path / "big.parquet"
    download_files([DownloadJob(server.url + "/big.parquet", dest)], **FAST)
    assert dest.read_bytes() == body
    first, second = server.requests
    assert first.range is None and first.sent == len(body) // 2
    assert second.range == f"bytes={len(body) // 2}-"
    assert second.sent == len(body) - len(body) // 2  # only the missing half travelled again


def test_server_that_ignores_range_restarts_the_file(server, tmp_path):
    body = parquet_bytes(1500)
    server.files["/x.parquet"] = body
    server.script["/x.parquet"] = ["cut", "ignore_range"]
    dest = tmp_path / "x.parquet"
    download_files([DownloadJob(server.url + "/x.parquet", dest)], **FAST)
    assert dest.read_bytes() == body
    assert server.requests[1].range is not None and server.requests[1].sent == len(body)


def test_partial_file_from_an_earlier_process_is_resumed(server, tmp_path):
    body = parquet_bytes(1000)
    server.files["/p.parquet"] = body
    dest = tmp_path / "p.parquet"
    (tmp_path / "p.parquet.tmp").write_bytes(body[:1234])
    download_files([DownloadJob(server.url + "/p.parquet", dest)], **FAST)
    assert dest.read_bytes() == body
    assert [r.range for r in server.requests] == ["bytes=1234-"]


def test_server_errors_are_retried_until_success(server, tmp_path):
    body = parquet_bytes(100)
    server.files["/s.parquet"] = body
    server.script["/s.parquet"] = [500, 503, "ok"]
    dest = tmp_path / "s.parquet"
    download_files([DownloadJob(server.url + "/s.parquet", dest)], retries=5, **FAST)
    assert dest.read_bytes() == body
    assert len(server.requests) == 3


def test_persistent_server_errors_give_up_after_the_retries(server, tmp_path):
    server.files["/down.parquet"] = parquet_bytes(10)
    server.script["/down.parquet"] = [502]
    with pytest.raises(DownloadError) as info:
        download_files([DownloadJob(server.url + "/down.parquet", tmp_path / "down.parquet")], retries=3, **FAST)
    assert len(server.requests) == 3
    assert "502" in str(info.value) and server.url + "/down.parquet" in str(info.value)


def test_backoff_grows_exponentially(server, tmp_path):
    server.files["/b.parquet"] = parquet_bytes(10)
    server.script["/b.parquet"] = [500, 500, 500, "ok"]
    started = time.perf_counter()
    download_files([DownloadJob(server.url + "/b.parquet", tmp_path / "b.parquet")],
                   retries=4, backoff=0.1, timeout=5, progress=False)
    assert time.perf_counter() - started >= 0.1 + 0.2 + 0.4


def test_404_fails_at_once_naming_the_url(server, tmp_path):
    url = server.url + "/missing.parquet"
    with pytest.raises(DownloadError) as info:
        download_files([DownloadJob(url, tmp_path / "missing.parquet")], retries=5, **FAST)
    assert len(server.requests) == 1  # no retries
    message = str(info.value)
    assert url in message and "404" in message
    assert "HF_ENDPOINT" in message and "--data builtin" in message
    assert not (tmp_path / "missing.parquet").exists()


def test_corrupt_file_is_rejected_and_never_renamed_into_place(server, tmp_path):
    server.files["/bad.parquet"] = b"<html>this is an error page, not parquet</html>" * 50
    dest = tmp_path / "bad.parquet"
    with pytest.raises(DownloadError) as info:
        download_files([DownloadJob(server.url + "/bad.parquet", dest)], retries=3, **FAST)
    assert len(server.requests) == 3  # each corrupt download was deleted and fetched again
    assert server.url + "/bad.parquet" in str(info.value) and "invalid" in str(info.value)
    assert not dest.exists() and not (tmp_path / "bad.parquet.tmp").exists()


def test_unreachable_server_says_what_to_do(tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/shard_00000.parquet"
    with pytest.raises(DownloadError) as info:
        download_files([DownloadJob(url, tmp_path / "x.parquet")], retries=2, **FAST)
    message = str(info.value)
    assert url in message and "network" in message
    assert "HF_ENDPOINT" in message and "local:PATH" in message


def test_parallel_download_of_several_shards(server, tmp_path):
    bodies = {f"/shard_{i:05d}.parquet": parquet_bytes(300 + i, tag=f"s{i}") for i in range(6)}
    server.files.update(bodies)
    server.delay = 0.2  # long enough that sequential downloads could not overlap
    jobs = [DownloadJob(server.url + path, tmp_path / path.lstrip("/")) for path in bodies]
    started = time.perf_counter()
    paths = download_files(jobs, workers=6, retries=2, backoff=0.001, timeout=5, progress=True)
    assert time.perf_counter() - started < 6 * 0.2
    assert server.max_in_flight > 1
    assert paths == [job.dest for job in jobs]
    for path, body in bodies.items():
        assert (tmp_path / path.lstrip("/")).read_bytes() == body


def test_one_failure_among_many_raises_and_keeps_the_good_files(server, tmp_path):
    server.files["/good.parquet"] = parquet_bytes(50)
    jobs = [DownloadJob(server.url + "/good.parquet", tmp_path / "good.parquet"),
            DownloadJob(server.url + "/gone.parquet", tmp_path / "gone.parquet")]
    with pytest.raises(DownloadError, match="gone.parquet"):
        download_files(jobs, workers=1, **FAST)
    assert validate_parquet(tmp_path / "good.parquet") == 50


def test_existing_valid_file_is_not_requested(server, tmp_path):
    dest = tmp_path / "have.parquet"
    dest.write_bytes(parquet_bytes(20))
    download_files([DownloadJob(server.url + "/have.parquet", dest)], **FAST)
    assert server.requests == []


def test_existing_corrupt_file_is_downloaded_again(server, tmp_path):
    body = parquet_bytes(20)
    server.files["/c.parquet"] = body
    dest = tmp_path / "c.parquet"
    dest.write_bytes(body[: len(body) // 2])  # truncated: the footer is gone
    download_files([DownloadJob(server.url + "/c.parquet", dest)], **FAST)
    assert dest.read_bytes() == body and len(server.requests) == 1


def test_validation_requires_rows_and_the_text_column(tmp_path):
    empty, other = tmp_path / "empty.parquet", tmp_path / "other.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    pq.write_table(pa.table({"body": ["x"]}), other)
    with pytest.raises(ValueError, match="no rows"):
        validate_parquet(empty)
    with pytest.raises(ValueError, match="no 'text' column"):
        validate_parquet(other)


COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEWER = "fedcba9876543210fedcba9876543210fedcba98"


def serve_dataset(server: FileServer, repo: str, names: dict[str, bytes], commit: str = COMMIT) -> str:
    """Serve `repo` as the Hub does: its files at /resolve/<commit>/, and the API answer that says
    which commit main points to. Returns the files' URL prefix."""
    server.files[f"/api/datasets/{repo}/revision/main"] = json.dumps({"id": repo, "sha": commit}).encode()
    base = f"/datasets/{repo}/resolve/{commit}/"
    for name, body in names.items():
        server.files[base + name] = body
    return base


CLIMBMIX_REPO = "karpathy/climbmix-400b-shuffle"
CLIMBMIX_API = f"/api/datasets/{CLIMBMIX_REPO}/revision/main"


def test_prepare_climbmix_honours_hf_endpoint_and_pins_the_commit_of_main(server, tmp_path, monkeypatch):
    base = serve_dataset(server, CLIMBMIX_REPO, {f"{name}.parquet": parquet_bytes(40, tag=name)
                                                 for name in ("shard_00000", "shard_00001", "shard_06542")})
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    expected = server.url + base + "shard_00000.parquet"
    assert hub_url(CLIMBMIX_REPO, "shard_00000.parquet", COMMIT) == expected

    split = prepare_data("climbmix", num_shards=2, workers=3, progress=False)
    directory = tmp_path / "cache" / "data" / "climbmix"
    assert split.directory == directory and split.revision == COMMIT
    assert split.train_files == [directory / "shard_00000.parquet", directory / "shard_00001.parquet"]
    assert split.val_file == directory / "shard_06542.parquet"
    assert sorted(server.paths()) == sorted(server.files)  # the API once, then each file at the commit
    assert split.val_file.read_bytes() == server.files[base + "shard_06542.parquet"]
    assert json.loads((directory / "revision.json").read_text())["revision"] == COMMIT

    again = prepare_data("climbmix", num_shards=2, progress=False)
    assert again == split and len(server.requests) == 4  # everything reused, nothing requested

    # main moves on; this cache stays on its commit, for the next shard and for a lost validation shard.
    serve_dataset(server, CLIMBMIX_REPO, {}, commit=NEWER)
    server.files[base + "shard_00002.parquet"] = parquet_bytes(40, tag="shard_00002")
    split.val_file.unlink()
    more = prepare_data("climbmix", num_shards=3, progress=False)
    assert more.revision == COMMIT and [p.name for p in more.train_files][-1] == "shard_00002.parquet"
    assert sorted(server.paths()[4:]) == [base + "shard_00002.parquet", base + "shard_06542.parquet"]


def test_a_pinned_revision_is_used_without_asking_the_hub(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    assert hub_revision(CLIMBMIX_REPO, tmp_path, "v1.0", offline=False, token=None, progress=False) == "v1.0"
    assert server.requests == [] and not (tmp_path / "revision.json").exists()
    assert hub_url(CLIMBMIX_REPO, "a.parquet", "refs/pr/1").endswith("/resolve/refs%2Fpr%2F1/a.parquet")


def test_a_mirror_without_the_hub_api_downloads_from_main_and_says_it_is_unpinned(server, tmp_path, monkeypatch,
                                                                                 capsys):
    base = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/"
    for name in ("shard_00000", "shard_01822"):
        server.files[f"{base}{name}.parquet"] = parquet_bytes(30, tag=name)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    split = prepare_data("fineweb-edu", num_shards=1, cache=tmp_path, progress=True)
    assert [p.name for p in split.train_files] == ["shard_00000.parquet"]
    assert split.val_file.name == "shard_01822.parquet" and split.revision == "main"
    said = capsys.readouterr().err
    assert "could not look up the commit" in said and "HTTP 404" in said and "not pinned" in said
    assert not (split.directory / "revision.json").exists()


def test_the_token_goes_to_the_hub_and_not_to_where_it_redirects(server, tmp_path, monkeypatch):
    base = serve_dataset(server, CLIMBMIX_REPO, {})
    server.files["/cdn/signed-val"] = parquet_bytes(30, tag="val")
    server.files["/cdn/signed-train"] = parquet_bytes(30, tag="train")
    server.script[base + "shard_06542.parquet"] = ["redirect:/cdn/signed-val"]
    server.script[base + "shard_00000.parquet"] = ["redirect:/cdn/signed-train"]
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    split = prepare_data("climbmix", num_shards=1, cache=tmp_path, progress=False)
    assert split.val_file.read_bytes() == server.files["/cdn/signed-val"]
    auth = {r.path: r.authorization for r in server.requests}
    assert auth[CLIMBMIX_API] == auth[base + "shard_06542.parquet"] == "Bearer hf_secret"
    assert auth["/cdn/signed-val"] is None and auth["/cdn/signed-train"] is None


def test_the_token_file_of_hf_auth_login_is_used_when_hf_token_is_unset(tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_token() is None
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "token").write_text("hf_from_file\n")
    assert hub_token() == "hf_from_file"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert hub_token() == "hf_from_env"


def test_a_refused_token_says_how_to_get_access(server, tmp_path):
    server.files["/private.parquet"] = parquet_bytes(10)
    server.script["/private.parquet"] = [401]
    with pytest.raises(DownloadError) as info:
        download_files([DownloadJob(server.url + "/private.parquet", tmp_path / "p.parquet")], **FAST)
    assert len(server.requests) == 1 and "HF_TOKEN" in info.value.hint


def test_hf_hub_offline_uses_the_cache_and_requests_nothing(server, tmp_path, monkeypatch):
    base = serve_dataset(server, CLIMBMIX_REPO, {f"{name}.parquet": parquet_bytes(40, tag=name)
                                          for name in ("shard_00000", "shard_00001", "shard_06542")})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    split = prepare_data("climbmix", num_shards=2, cache=tmp_path, progress=False)
    requests = len(server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert prepare_data("climbmix", num_shards=2, cache=tmp_path, progress=False) == split
    with pytest.raises(DownloadError) as info:
        prepare_data("climbmix", num_shards=3, cache=tmp_path, progress=False)
    assert "shard_00002.parquet is not in the cache" in str(info.value) and "HF_HUB_OFFLINE" in info.value.hint
    assert len(server.requests) == requests  # nothing asked of the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # not a true value: online again
    server.files[base + "shard_00002.parquet"] = parquet_bytes(40, tag="shard_00002")
    assert len(prepare_data("climbmix", num_shards=3, cache=tmp_path, progress=False).train_files) == 3


def test_prepare_tinystories_downloads_one_file_and_splits_it(server, tmp_path, monkeypatch):
    serve_dataset(server, "karpathy/tinystories-gpt4-clean",
                  {"tinystories_gpt4_clean.parquet": parquet_bytes(10_050, tag="story", row_group_size=3000)})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    split = prepare_data("tinystories", cache=tmp_path, progress=False)
    assert validate_parquet(split.val_file) == 10_000 and split.revision == COMMIT
    val = pq.read_table(split.val_file).column("text").to_pylist()
    train = [t for f in split.train_files for t in pq.read_table(f).column("text").to_pylist()]
    assert val[0].startswith("story 0:") and val[-1].startswith("story 9999:")
    assert len(train) == 50 and train[0].startswith("story 10000:")
    assert prepare_data("tinystories", cache=tmp_path, progress=False) == split
    assert len(server.requests) == 2  # the commit of main, then the file; the second call asked nothing


CONCURRENT = """
import sys
from harness.data.sources import prepare_data
split = prepare_data("climbmix", num_shards=2, progress=True)
print(split.val_file.read_bytes().hex()[:64], split.revision)
"""


def test_two_processes_preparing_one_source_take_turns(server, tmp_path):
    base = serve_dataset(server, CLIMBMIX_REPO, {f"{name}.parquet": parquet_bytes(3000, tag=name)
                                                 for name in ("shard_00000", "shard_00001", "shard_06542")})
    server.delay = 1.0  # each request takes a second: the processes overlap for sure
    env = {**os.environ, "HF_ENDPOINT": server.url, "AUTORESEARCH_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT], cwd=PROJECT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert outputs[0][0] == outputs[1][0] and COMMIT in outputs[0][0]
    assert sorted(server.paths()) == sorted(server.files)  # every file once: the second process reused them
    assert sum("waiting for another process" in err for _, err in outputs) == 1
    directory = tmp_path / "cache" / "data" / "climbmix"
    assert not list(directory.glob("*.tmp"))
    assert validate_parquet(directory / "shard_06542.parquet") == 3000
    assert (directory / "shard_06542.parquet").read_bytes() == server.files[base + "shard_06542.parquet"]


# -- through the real CLI: `autoresearch setup` against the server -------------------------------

TINYSTORIES = "karpathy/tinystories-gpt4-clean"
TINY_FILE = "tinystories_gpt4_clean.parquet"  # served with too few rows: setup stops right after the data


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from conftest import copy_project

    return copy_project(tmp_path_factory.mktemp("download-project"))


def setup_cli(project: Path, cache: Path, server: FileServer, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AUTORESEARCH_ROOT", "COLUMNS"))}
    full_env.update({"AUTORESEARCH_CACHE": str(cache), "HF_ENDPOINT": server.url, "HF_HOME": str(cache / "hf")}, **env)
    return subprocess.Popen([sys.executable, "-m", "autoresearch", "setup", "--preset", "cpu-tiny", "--data", "tinystories"],
                            cwd=project, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=180)
    return proc.returncode, err


def test_setup_downloads_at_the_pinned_commit_with_the_token(project, server, tmp_path):
    base = serve_dataset(server, TINYSTORIES, {TINY_FILE: parquet_bytes(50, tag="story")})
    code, err = finish(setup_cli(project, tmp_path / "cache", server, HF_TOKEN="hf_secret"))
    assert code == 1 and f"{TINY_FILE} has only 50 rows" in err, err[-2000:]
    assert [(r.path, r.authorization) for r in server.requests] == [
        (f"/api/datasets/{TINYSTORIES}/revision/main", "Bearer hf_secret"), (base + TINY_FILE, "Bearer hf_secret")]
    assert f"pinned to commit {COMMIT}" in err


def test_setup_with_hf_hub_offline_requests_nothing_and_says_why(project, server, tmp_path):
    serve_dataset(server, TINYSTORIES, {TINY_FILE: parquet_bytes(50, tag="story")})
    code, err = finish(setup_cli(project, tmp_path / "cache", server, HF_HUB_OFFLINE="1"))
    assert code == 1 and server.requests == []
    error = next(line for line in err.splitlines() if line.startswith("Error:"))
    hint = next(line for line in err.splitlines() if line.startswith("Hint:"))
    assert f"{TINY_FILE} is not in the cache" in error and "HF_HUB_OFFLINE is set" in hint


def test_two_setups_at_once_download_the_file_once(project, server, tmp_path):
    base = serve_dataset(server, TINYSTORIES, {TINY_FILE: parquet_bytes(3000, tag="story")})
    server.delay = 2.0  # the first setup's download is still in flight when the second gets there
    procs = [setup_cli(project, tmp_path / "cache", server) for _ in range(2)]
    results = [finish(proc) for proc in procs]
    for code, err in results:  # both got the whole file: it has too few rows, not a corrupt footer
        assert code == 1 and f"{TINY_FILE} has only 3000 rows" in err, err[-2000:]
    assert server.paths().count(base + TINY_FILE) == 1
    assert sum("waiting for another process" in err for _, err in results) == 1
    assert not list((tmp_path / "cache").rglob("*.tmp"))
