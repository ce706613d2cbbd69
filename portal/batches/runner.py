"""The runner of one batch shard, inside its array task: `python -m portal.batches.runner --shard K --server-pid P`.

The task's job script (templates/jobs/batch.sh.j2) has started the model's engine server exactly as a service's job
does (the same command and arguments, behind the key guard), with a key made for this task and on a free port of the
loopback; the runner waits until it answers its health path, then sends the shard's lines to it, at most
`concurrency` at once, and appends each answer as one line to shard-NNNN.output.jsonl and each line that failed (a
non-2xx answer, or no answer after retries) to shard-NNNN.errors.jsonl, one write per line as it arrives. A task
killed at its time limit loses only the lines in flight.

Resume: on start it reads the custom_ids both files already hold (a last line cut short by a kill is cut off) and
skips them, so a task submitted again for the same shard carries on where the last one stopped, and no custom_id is
ever written twice (the shard's lock file keeps a second runner of the same shard out). When the server goes away
mid-run, or the task is told to stop, lines in flight are not written at all: they are sent again next time. Told to
stop (SIGTERM: a cancel, the time limit), it cuts its connections at once, so the engine's server, stopping too, is
not held by them until the scheduler's SIGKILL.

Audio lines (portal/batches/audio.py) go to the Whisper server as multipart, their file read as it is sent; a file
that cannot be read when its line runs is an error line with the reason. A folder's transcription (FolderRunner)
lists the folder's audio files as the shard's lines as it finds them and writes each answer as a transcript in the
output folder's mirror tree (portal/batches/folder_files.py).

Why not `vllm run-batch`: it writes its output file only once every line is done, so a shard killed by its time limit
would lose everything; driving the same engine's server keeps each answer the moment it arrives, and works the same
for every engine with an OpenAI server (vLLM, llama.cpp, our Whisper server).

Standard library only (it runs with the portal's Python, the portal's code on PYTHONPATH). Exit codes: 0 every line
answered or failed, 1 an error of the runner itself (its traceback in the task's log), 3 the server did not start or
went away, 75 another runner holds the shard, 143 told to stop.
"""
from __future__ import annotations

import argparse
import fcntl
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Iterator, Optional, Tuple

from .audio import AudioFileError, is_audio_endpoint, multipart, resolve
from .folder_files import new_files, write_transcript
from .lines import (answered_ids, complete_lines, error_line, errors_path, input_ids, output_line, output_path,
                    shard_path, trim_partial_line)

CONFIG_NAME = "batch.json"  # written by the portal in the batch's folder (portal/batches/submission.py)
RETRIES = 3  # tries of a line that met a transport error, a 429 or a 5xx
BACKOFF_SECONDS = 1.0
REQUEST_TIMEOUT = 600.0
HEALTH_INTERVAL = 1.0
SETTLE_SECONDS = 2.0  # a folder's file changed more recently than this may still be being copied in: it waits
EXIT_FAILED = 1
EXIT_SERVER = 3
EXIT_LOCKED = 75
EXIT_STOPPED = 143


class ServerGone(Exception):
    """The engine's server no longer answers (it ended, or the task is stopping)."""


def say(message: str) -> None:
    print(f"pilotfish batch runner: {message}", flush=True)


class Runner:
    def __init__(self, folder: Path, shard: int, config: dict, port: int, key: str, server_pid: Optional[int]):
        self.folder, self.shard, self.config = folder, shard, config
        self.port, self.key, self.server_pid = port, key, server_pid
        self.endpoint = config["endpoint"]
        self.audio = is_audio_endpoint(self.endpoint)
        self.done: set = set()  # custom_ids answered or failed
        self.concurrency = max(1, int(config.get("concurrency", 1)))
        self.stopping = threading.Event()
        self.server_gone = threading.Event()
        self.broken = threading.Event()  # a sender met an error of the runner's own (self.failure)
        self.failure = ""
        self._lines_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.answered = self.failed = 0
        self._output_fd = self._errors_fd = -1
        self._boxes: list = []  # each sender's connection to the server (a one-item list), for stop()

    def stop(self) -> None:
        """Told to stop (SIGTERM: a cancel, the time limit): nothing more is sent, and the requests in flight are cut
        off at once (their lines are sent again next time). Waiting for their answers would keep the engine's server,
        which is stopping too, waiting on these connections until the scheduler's SIGKILL."""
        self.stopping.set()
        for box in list(self._boxes):
            connection = box[0]
            if connection is not None and connection.sock is not None:
                try:
                    connection.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # --- the server -----------------------------------------------------------------------------------

    def server_alive(self) -> bool:
        if self.server_pid is None:
            return True
        try:
            os.kill(self.server_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a zombie (ended, not yet reaped by the job script) is gone too
            with open(f"/proc/{self.server_pid}/stat") as stat:
                return stat.read().rpartition(")")[2].split()[0] != "Z"
        except OSError:
            return True

    def wait_healthy(self, timeout: float) -> bool:
        path = self.config.get("health_path") or "/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping.is_set():
            if not self.server_alive():
                say("the engine's server exited before it answered (see its lines above)")
                return False
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                connection.request("GET", path, headers={"Authorization": f"Bearer {self.key}"})
                if connection.getresponse().status == 200:
                    return True
            except OSError:
                pass
            finally:
                connection.close()
            self.stopping.wait(HEALTH_INTERVAL)
        return False

    # --- the lines ------------------------------------------------------------------------------------

    def pending(self, done: set) -> Iterator[Tuple[str, dict]]:
        for raw in complete_lines(shard_path(self.folder, self.shard)):
            line = json.loads(raw)
            if line["custom_id"] not in done:
                yield line["custom_id"], line.get("body") or {}

    def send(self, connection: http.client.HTTPConnection, body: dict, audio: Optional[Tuple[int, str]] = None) \
            -> Tuple[int, bytes, str]:
        """One request: the body as JSON, or for an audio line (`audio`: its open file and its name) as multipart with
        the file read as it is sent."""
        headers = {"Authorization": f"Bearer {self.key}"}
        if audio is None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        else:
            headers["Content-Type"], length, payload = multipart(body, *audio)
            headers["Content-Length"] = str(length)
        connection.request("POST", self.endpoint, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read()
        return response.status, data, response.getheader("x-request-id") or ""

    def run_line(self, connection_box: list, custom_id: str, body: dict) -> Tuple[bytes, bool]:
        """(the line to write, whether it is an error line) for one request; ServerGone when nothing may be written
        (it is sent again when the shard runs again)."""
        if not self.audio:
            return self.request_line(connection_box, custom_id, body, None)
        try:
            fd, filename = resolve(str(body.get("file", "")), self.config.get("files") or {},
                                   self.config.get("audio_roots"))
        except AudioFileError as exc:
            return error_line(custom_id, "invalid_file", str(exc)), True
        try:
            return self.request_line(connection_box, custom_id, body, (fd, filename))
        finally:
            os.close(fd)

    def request_line(self, connection_box: list, custom_id: str, body: dict, audio: Optional[Tuple[int, str]]) \
            -> Tuple[bytes, bool]:
        """run_line's request, tried up to RETRIES times (`audio`: the open file of an audio line, and its name)."""
        last_error = ""
        for attempt in range(RETRIES):
            if self.stopping.is_set() or self.server_gone.is_set():
                raise ServerGone()
            if connection_box[0] is None:
                connection_box[0] = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
            try:
                status, data, request_id = self.send(connection_box[0], body, audio)
            except (OSError, http.client.HTTPException) as exc:
                connection_box[0].close()
                connection_box[0] = None
                last_error = f"{type(exc).__name__}: {exc}"
                if self.stopping.is_set() or not self.server_alive():
                    self.server_gone.set()
                    raise ServerGone()
                time.sleep(BACKOFF_SECONDS * (2 ** attempt))
                continue
            try:
                answer = json.loads(data) if data else None
            except ValueError:
                answer = data.decode("utf-8", "replace")
            if not request_id and isinstance(answer, dict):
                request_id = str(answer.get("id") or "")
            if 200 <= status < 300:
                return self.answer_line(custom_id, status, request_id, answer, body)
            if (status == 429 or status >= 500) and attempt + 1 < RETRIES:
                last_error = f"HTTP {status}"
                time.sleep(BACKOFF_SECONDS * (2 ** attempt))
                continue
            message = answer.get("error", answer) if isinstance(answer, dict) else answer
            if isinstance(message, dict):
                message = message.get("message") or json.dumps(message)
            return error_line(custom_id, f"http_{status}", str(message)[:2000], status=status, body=answer,
                              request_id_=request_id), True
        return error_line(custom_id, "no_answer", f"no answer after {RETRIES} tries: {last_error}"), True

    def answer_line(self, custom_id: str, status: int, request_id: str, answer, body: dict) -> Tuple[bytes, bool]:
        """(the line to write, whether it is an error line) for an answer that came back."""
        return output_line(custom_id, status, request_id, answer), False

    def write(self, line: bytes, failed: bool) -> None:
        with self._write_lock:
            os.write(self._errors_fd if failed else self._output_fd, line)
            if failed:
                self.failed += 1
            else:
                self.answered += 1

    def worker(self, lines: Iterator[Tuple[str, dict]]) -> None:
        box = [None]
        self._boxes.append(box)
        try:
            while not self.stopping.is_set() and not self.server_gone.is_set() and not self.broken.is_set():
                with self._lines_lock:
                    item = next(lines, None)
                if item is None:
                    return
                try:
                    line, failed = self.run_line(box, *item)
                except ServerGone:
                    return
                self.write(line, failed)  # an answer that came back is kept, even while stopping
                self.done.add(item[0])
        except Exception as exc:  # a fault of the runner itself: the task ends with it, the lines left run again
            self.failure = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            self.broken.set()
        finally:
            if box[0] is not None:
                box[0].close()

    def lock(self):
        """The shard's lock (held while this process lives), or None when another runner holds it."""
        handle = open(self.folder / f"shard-{self.shard:04d}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            say(f"shard {self.shard}: another runner holds it; this one stops")
            handle.close()
            return None
        return handle

    def start(self, start_timeout: float) -> Optional[int]:
        """Wait for the engine's server, then open the answers and errors files: None, or the exit code."""
        started = time.monotonic()
        if not self.wait_healthy(start_timeout):
            if self.stopping.is_set():
                return EXIT_STOPPED
            say(f"the engine's server did not answer within {start_timeout:g} s")
            return EXIT_SERVER
        say(f"the engine answered after {time.monotonic() - started:.1f} s")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        self._output_fd = os.open(output_path(self.folder, self.shard), flags, 0o600)
        self._errors_fd = os.open(errors_path(self.folder, self.shard), flags, 0o600)
        self.sending = time.monotonic()
        return None

    def send_lines(self) -> None:
        """Send every line of the shard file not done yet, `concurrency` at once, until done or stopped."""
        lines = self.pending(self.done)
        threads = [threading.Thread(target=self.worker, args=(lines,), name=f"line-{n}", daemon=True)
                   for n in range(self.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)

    def finish(self) -> int:
        os.close(self._output_fd)
        os.close(self._errors_fd)
        seconds = time.monotonic() - self.sending
        rate = (self.answered + self.failed) / seconds if seconds > 0 else 0.0
        say(f"shard {self.shard}: {self.answered} answered, {self.failed} failed in {seconds:.1f} s "
            f"({rate:.1f} lines/s)")
        if self.broken.is_set():
            say(f"stopped by an error of the runner ({self.failure}): the lines left are sent when the shard runs "
                f"again")
            return EXIT_FAILED
        if self.stopping.is_set():
            return EXIT_STOPPED
        if self.server_gone.is_set():
            say("the engine's server went away: the lines left are sent when the shard runs again")
            return EXIT_SERVER
        return 0

    def run(self, start_timeout: float) -> int:
        lock = self.lock()
        if lock is None:
            return EXIT_LOCKED
        self.done = answered_ids(output_path(self.folder, self.shard), errors_path(self.folder, self.shard))
        total = sum(1 for _ in complete_lines(shard_path(self.folder, self.shard)))
        if len(self.done) >= total:
            say(f"shard {self.shard}: all {total} lines already answered")
            return 0
        say(f"shard {self.shard}: {total} lines, {len(self.done)} already answered; waiting for the engine's server")
        code = self.start(start_timeout)
        if code is not None:
            return code
        say(f"sending {total - len(self.done)} lines, {self.concurrency} at once")
        self.send_lines()
        return self.finish()


class FolderRunner(Runner):
    """A folder's transcription (batch.json's `folder`: source, output, extension, and the body of each request): the
    shard's lines are the folder's audio files, appended as passes over the folder find them (a file whose
    transcript exists is skipped), each answer written as its transcript in the mirror tree; after each pass the
    folder is looked at again, until a pass finds nothing new."""

    def __init__(self, *args):
        super().__init__(*args)
        self.spec = self.config["folder"]
        self.skipped: set = set()
        self.unsettled: set = set()  # files changed in the last SETTLE_SECONDS: perhaps still being copied in

    def scan(self, listed: set) -> int:
        """Append a line for each new audio file of the folder that has not changed for SETTLE_SECONDS; how many."""
        spec, found = self.spec, []
        self.unsettled = set()
        for relative, path in new_files(spec["source"], spec["output"], spec["extension"], listed, self.skipped,
                                        time.time() - SETTLE_SECONDS, self.unsettled):
            body = dict(spec["body"], model=self.config["model"], file=path)
            found.append(json.dumps({"custom_id": relative, "method": "POST", "url": self.endpoint, "body": body},
                                    separators=(",", ":")).encode() + b"\n")
            listed.add(relative)
        if found:
            fd = os.open(shard_path(self.folder, self.shard), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                for line in found:
                    os.write(fd, line)
            finally:
                os.close(fd)
        return len(found)

    def answer_line(self, custom_id: str, status: int, request_id: str, answer, body: dict) -> Tuple[bytes, bool]:
        try:
            target, size = write_transcript(self.spec["output"], custom_id, self.spec["extension"], answer,
                                            self.config.get("audio_roots"))
        except OSError as exc:
            return error_line(custom_id, "output_not_written", f"the transcript was not written: "
                                                               f"{exc.strerror or exc}"), True
        return output_line(custom_id, status, request_id, {"file": body.get("file"), "output": str(target),
                                                           "bytes": size}), False

    def run(self, start_timeout: float) -> int:
        lock = self.lock()
        if lock is None:
            return EXIT_LOCKED
        shard = shard_path(self.folder, self.shard)
        trim_partial_line(shard)
        self.done = answered_ids(output_path(self.folder, self.shard), errors_path(self.folder, self.shard))
        listed = set(input_ids(shard))
        self.scan(listed)
        while not listed - self.done and self.unsettled and not self.stopping.wait(SETTLE_SECONDS / 2):
            self.scan(listed)  # only files still being written: wait until they settle
        if not listed - self.done:
            say(f"{self.spec['source']}: nothing to transcribe ({len(self.skipped)} file(s) already done)")
            return 0
        say(f"{self.spec['source']}: {len(listed - self.done)} file(s) to transcribe, {len(self.skipped)} already "
            f"done; waiting for the engine's server")
        code = self.start(start_timeout)
        if code is not None:
            return code
        passes = 0
        while not self.stopping.is_set() and not self.server_gone.is_set():
            self.send_lines()
            passes += 1
            found = self.scan(listed)
            while not found and self.unsettled and not self.stopping.wait(SETTLE_SECONDS / 2):
                found = self.scan(listed)  # files still being written: looked at again once settled
            if self.stopping.is_set() or self.server_gone.is_set() or not found:
                break
        say(f"{passes} pass(es) over {self.spec['source']}; {len(self.skipped)} file(s) skipped (already done)")
        return self.finish()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portal.batches.runner")
    parser.add_argument("--shard", type=int, required=True)
    parser.add_argument("--server-pid", type=int)
    parser.add_argument("--folder", default=".")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    kind = FolderRunner if config.get("folder") else Runner
    runner = kind(folder, args.shard, config, int(os.environ["PILOTFISH_PORT"]), os.environ["PILOTFISH_API_KEY"],
                  args.server_pid)

    def stop(signum, frame):
        say(f"signal {signum}: stopping (lines in flight are sent again next time)")
        runner.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return runner.run(float(config.get("start_timeout", 3600)))


if __name__ == "__main__":
    sys.exit(main())
