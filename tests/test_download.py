"""The downloader against a real HTTP server on 127.0.0.1 that can cut connections, fail, ignore
Range headers and serve garbage, with parquet files generated here."""

from __future__ import annotations

import io
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.data.sources import hub_url, prepare_data
from harness.data.download import DownloadError, DownloadJob, download_files, validate_parquet

FAST = dict(backoff=0.001, timeout=5.0, progress=False)


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


@dataclass
class FileServer:
    """Serves `files` (URL path -> bytes). `script[path]` is a list of behaviours used up one per
    request: "ok", "cut" (half the bytes, then the connection closes), "ignore_range" (a full 200
    whatever Range says), or an HTTP status code to answer with. Missing paths answer 404."""

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
                record = Request(self.path, self.headers.get("Range"))
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


CLIMBMIX = "/datasets/karpathy/climbmix-400b-shuffle/resolve/main/"


def test_prepare_climbmix_honours_hf_endpoint(server, tmp_path, monkeypatch):
    for name in ("shard_00000", "shard_00001", "shard_06542"):
        server.files[f"{CLIMBMIX}{name}.parquet"] = parquet_bytes(40, tag=name)
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    expected = server.url + CLIMBMIX + "shard_00000.parquet"
    assert hub_url("karpathy/climbmix-400b-shuffle", "shard_00000.parquet") == expected

    split = prepare_data("climbmix", num_shards=2, workers=3, progress=False)
    directory = tmp_path / "cache" / "data" / "climbmix"
    assert split.directory == directory
    assert split.train_files == [directory / "shard_00000.parquet", directory / "shard_00001.parquet"]
    assert split.val_file == directory / "shard_06542.parquet"
    assert sorted(server.paths()) == sorted(server.files)
    assert split.val_file.read_bytes() == server.files[CLIMBMIX + "shard_06542.parquet"]

    again = prepare_data("climbmix", num_shards=2, progress=False)
    assert again == split and len(server.requests) == 3  # everything reused, nothing requested


def test_prepare_fineweb_edu_pins_its_last_shard_for_validation(server, tmp_path, monkeypatch):
    base = "/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/"
    for name in ("shard_00000", "shard_01822"):
        server.files[f"{base}{name}.parquet"] = parquet_bytes(30, tag=name)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    split = prepare_data("fineweb-edu", num_shards=1, cache=tmp_path, progress=False)
    assert [p.name for p in split.train_files] == ["shard_00000.parquet"]
    assert split.val_file.name == "shard_01822.parquet"


def test_prepare_tinystories_downloads_one_file_and_splits_it(server, tmp_path, monkeypatch):
    base = "/datasets/karpathy/tinystories-gpt4-clean/resolve/main/"
    server.files[base + "tinystories_gpt4_clean.parquet"] = parquet_bytes(10_050, tag="story", row_group_size=3000)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    split = prepare_data("tinystories", cache=tmp_path, progress=False)
    assert validate_parquet(split.val_file) == 10_000
    val = pq.read_table(split.val_file).column("text").to_pylist()
    train = [t for f in split.train_files for t in pq.read_table(f).column("text").to_pylist()]
    assert val[0].startswith("story 0:") and val[-1].startswith("story 9999:")
    assert len(train) == 50 and train[0].startswith("story 10000:")
    assert prepare_data("tinystories", cache=tmp_path, progress=False) == split
    assert len(server.requests) == 1
