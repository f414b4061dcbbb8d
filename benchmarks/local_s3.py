"""A local S3-compatible endpoint for tests and benchmarks: moto's server in a child process, on a free port.

Clients find it the way they find MinIO, Ceph or R2: through the standard AWS
variables (``AWS_ENDPOINT_URL`` and credentials), which botocore, hence s3fs,
zarr and needleprobe, read.  Nothing in needleprobe knows it is talking to a
test server; the child process keeps the endpoint's CPU work out of the
client's interpreter, as a real endpoint would.

    with LocalS3() as s3:          # raises EndpointUnavailable if it cannot start
        os.environ.update(s3.env)  # or pass s3.env to child processes
        url = s3.bucket_url        # s3://needleprobe-test
"""

from __future__ import annotations

import importlib.util
import os
import select
import subprocess
import sys
import tempfile
import time

# The child binds port 0 (no race for a port), prints the one it got, and serves until stdin closes.
_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


class EndpointUnavailable(RuntimeError):
    """moto or s3fs is missing, or the server did not start: the caller skips, saying this."""


class LocalS3:
    def __init__(self, bucket: str = "needleprobe-test", timeout: float = 60.0):
        self.bucket, self.timeout = bucket, timeout
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    @property
    def bucket_url(self) -> str:
        return f"s3://{self.bucket}"

    def start(self) -> "LocalS3":
        missing = [m for m in ("moto", "flask", "s3fs") if importlib.util.find_spec(m) is None]  # flask: moto[server]
        if missing:
            raise EndpointUnavailable(f"{', '.join(missing)} not installed (pip install -e '.[dev]')")
        log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on it
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)  # the port, or EOF if the child died
        port = self.proc.stdout.readline().strip() if ready else ""
        if not port.isdigit():
            self.stop()
            log.seek(0)
            err = log.read().strip().splitlines()
            raise EndpointUnavailable("moto's server did not start: " + (err[-1] if err else f"no port in {self.timeout:g} s"))
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.filesystem().mkdir(self.bucket)
                return self
            except OSError as e:
                if time.monotonic() > deadline:
                    self.stop()
                    raise EndpointUnavailable(f"the endpoint at {self.env['AWS_ENDPOINT_URL']} did not answer: {e}") from None
                time.sleep(0.2)

    def filesystem(self):
        """An s3fs client of this endpoint of its own (not fsspec's shared instance, which follows the environment)."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.env["AWS_ENDPOINT_URL"], key="testing", secret="testing",
                                 skip_instance_cache=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # the child stops its server and exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        forget_s3_clients()

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def forget_s3_clients() -> None:
    """Close and drop fsspec's cached s3fs instances (this process's and zarr's): they keep the endpoint they were
    made with, and one dropped with its session open is reported as unclosed at exit."""
    try:
        import s3fs
    except ImportError:
        return
    for fs in list(s3fs.S3FileSystem._cache.values()):
        if getattr(fs, "_s3", None) is None:
            continue
        if fs.asynchronous:  # zarr's: its client lives on zarr's event loop
            from zarr.core.sync import sync

            sync(fs._s3.close())
        else:
            s3fs.S3FileSystem.close_session(fs.loop, fs._s3)
    s3fs.S3FileSystem.clear_instance_cache()


if __name__ == "__main__":  # a quick manual check: start, write, read, stop
    with LocalS3() as s3:
        fs = s3.filesystem()
        fs.pipe_file(f"{s3.bucket}/hello", b"world")
        print(s3.env["AWS_ENDPOINT_URL"], fs.cat_file(f"{s3.bucket}/hello"), os.getpid())
