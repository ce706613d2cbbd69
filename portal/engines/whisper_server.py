"""An OpenAI-compatible speech-recognition server over faster-whisper (CTranslate2 Whisper models).

    python -m portal.engines.whisper_server --model DIR --served-model-name NAME --port P [--host H]
        [--compute-type int8] [--beam-size 5] [--language en] [--device cpu] [--cpu-threads N]

Endpoints: POST /v1/audio/transcriptions and /v1/audio/translations (multipart: file, model, language, prompt,
response_format json|text|verbose_json|srt|vtt, temperature), GET /v1/models, GET /health. Every path, /health
included, needs `Authorization: Bearer $PILOTFISH_API_KEY` (the key guard, portal/engines/guard/pilotfish_guard.py;
the job script sets the key and puts the guard on PYTHONPATH; the key never appears on the command line). Uploads
are spooled to disk, never held in memory whole. Errors have
OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from typing import List, Optional

from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.formparser import parse_form_data
from werkzeug.wrappers import Request, Response

try:
    import pilotfish_guard  # on PYTHONPATH in a service job (the engine's virtualenv has no Pilotfish)
except ImportError:  # imported from a Pilotfish checkout
    from portal.engines.guard import pilotfish_guard

log = logging.getLogger("pilotfish.whisper")
RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return Response(json.dumps(body), status=self.status, mimetype="application/json")


def _timestamp(seconds: float, separator: str) -> str:
    millis = int(round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def subtitles(segments: List[dict], style: str) -> str:
    """SRT or WebVTT text from transcription segments: one cue per segment with words, its text on one line (a blank
    line or an arrow inside a cue would end it or be read as its timing for a player)."""
    blocks = []
    separator = "," if style == "srt" else "."
    for segment in segments:
        text = " ".join(segment["text"].split()).replace("-->", "->")
        if not text:
            continue
        times = f"{_timestamp(segment['start'], separator)} --> {_timestamp(segment['end'], separator)}"
        blocks.append(f"{len(blocks) + 1}\n{times}\n{text}\n" if style == "srt" else f"{times}\n{text}\n")
    return ("WEBVTT\n\n" if style == "vtt" else "") + "\n".join(blocks)


class WhisperServer:
    """The WSGI application: one faster-whisper model, transcriptions one at a time (the CPU is the limit)."""

    def __init__(self, model, served_name: str, api_key: Optional[str], beam_size: int = 5,
                 language: Optional[str] = None, max_upload_bytes: int = 2 << 30):
        """`api_key`: the key every request must send (None: $PILOTFISH_API_KEY; no key at all refuses to start)."""
        self.model = model
        self.served_name = served_name
        self.beam_size = beam_size
        self.language = language
        self.max_upload_bytes = max_upload_bytes
        self.lock = threading.Lock()
        self.created = int(time.time())
        self.guarded = pilotfish_guard.WsgiKeyGuard(self.answer, api_key)  # every path needs the key

    def __call__(self, environ, start_response):
        return self.guarded(environ, start_response)

    def answer(self, environ, start_response):
        request = Request(environ)
        try:
            response = self.dispatch(request)
        except ApiError as exc:
            response = exc.response()
        except RequestEntityTooLarge:
            response = ApiError(413, f"the upload is larger than {self.max_upload_bytes} bytes", "file").response()
        except HTTPException as exc:
            response = ApiError(exc.code or 400, exc.description or exc.name).response()
        except Exception:  # noqa: BLE001 - one answer for anything unexpected, details in the log only
            log.exception("transcription failed")
            response = ApiError(500, "internal error: see the server log", kind="server_error").response()
        return response(environ, start_response)

    def dispatch(self, request: Request) -> Response:
        path = request.path.rstrip("/") or "/"
        if path == "/health":
            return Response("", status=200)
        if path == "/v1/models":
            if request.method != "GET":
                raise ApiError(405, "use GET")
            data = [{"id": self.served_name, "object": "model", "created": self.created, "owned_by": "pilotfish"}]
            return Response(json.dumps({"object": "list", "data": data}), mimetype="application/json")
        if path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            if request.method != "POST":
                raise ApiError(405, "use POST with multipart/form-data")
            return self.transcribe(request, task="translate" if path.endswith("translations") else "transcribe")
        raise ApiError(404, f"no such endpoint: {request.method} {request.path}", code="not_found")

    def transcribe(self, request: Request, task: str) -> Response:
        if request.content_length is not None and request.content_length > self.max_upload_bytes:
            raise RequestEntityTooLarge()
        if not request.mimetype == "multipart/form-data":
            raise ApiError(400, "expected multipart/form-data with a `file` field", "file")
        _, form, files = parse_form_data(request.environ, max_content_length=self.max_upload_bytes, silent=False)
        upload = files.get("file")
        if upload is None or not upload.filename:
            raise ApiError(400, "missing the `file` field (the audio to transcribe)", "file")
        model_name = form.get("model")
        if not model_name:
            raise ApiError(400, "missing the `model` field", "model")
        if model_name != self.served_name:
            raise ApiError(404, f"The model `{model_name}` does not exist; this server serves `{self.served_name}`.",
                           "model", "model_not_found")
        response_format = form.get("response_format") or "json"
        if response_format not in RESPONSE_FORMATS:
            raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}", "response_format")
        try:
            temperature = float(form.get("temperature") or 0.0)
        except ValueError:
            raise ApiError(400, "temperature must be a number", "temperature")
        if not 0.0 <= temperature <= 1.0:
            raise ApiError(400, "temperature must be between 0 and 1", "temperature")
        language = form.get("language") or self.language
        with tempfile.NamedTemporaryFile(suffix=os.path.splitext(upload.filename)[1][:10]) as audio:
            upload.save(audio)
            audio.flush()
            upload.close()
            with self.lock:
                try:
                    segments, info = self.model.transcribe(audio.name, task=task, language=language,
                                                           initial_prompt=form.get("prompt") or None,
                                                           temperature=temperature, beam_size=self.beam_size)
                    segments = [{"id": seg.id, "seek": seg.seek, "start": seg.start, "end": seg.end, "text": seg.text,
                                 "tokens": list(seg.tokens), "temperature": seg.temperature,
                                 "avg_logprob": seg.avg_logprob, "compression_ratio": seg.compression_ratio,
                                 "no_speech_prob": seg.no_speech_prob} for seg in segments]
                except Exception as exc:  # noqa: BLE001 - sorted below: the caller's file or language, or ours
                    if type(exc).__module__.split(".")[0] == "av":  # PyAV could not decode it
                        raise ApiError(400, f"could not decode {upload.filename!r} as audio", "file")
                    if isinstance(exc, ValueError):  # e.g. an unknown language code
                        raise ApiError(400, str(exc), "language")
                    raise
        text = "".join(seg["text"] for seg in segments).strip()
        if response_format == "text":
            return Response(text + "\n", mimetype="text/plain")
        if response_format in ("srt", "vtt"):
            return Response(subtitles(segments, response_format), mimetype="text/plain")
        if response_format == "verbose_json":
            body = {"task": task, "language": info.language, "duration": info.duration, "text": text,
                    "segments": segments}
        else:
            body = {"text": text}
        return Response(json.dumps(body), mimetype="application/json")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m portal.engines.whisper_server", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a CTranslate2 Whisper model directory")
    parser.add_argument("--served-model-name", help="the name clients send as `model` (default: the directory)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--ssl-keyfile", help="serve TLS with this private key (and --ssl-certfile)")
    parser.add_argument("--ssl-certfile", help="serve TLS with this certificate (and --ssl-keyfile)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--compute-type", default="default", help="int8, float16, ... (default: the model's)")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--language", help="language code when every request is in one language (e.g. en)")
    parser.add_argument("--cpu-threads", type=int, default=int(os.environ.get("SLURM_CPUS_PER_TASK") or 0),
                        help="threads for the CPU (default: the job's CPUs)")
    parser.add_argument("--threads", type=int, default=8, help="HTTP threads (uploads in parallel)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from faster_whisper import WhisperModel
    from gunicorn.app.base import BaseApplication

    def build_app() -> WhisperServer:
        # Loaded in the worker, after gunicorn forks: CTranslate2's threads do not survive a fork.
        started = time.monotonic()
        model = WhisperModel(args.model, device=args.device, compute_type=args.compute_type,
                             cpu_threads=args.cpu_threads)
        log.info("loaded %s in %.1f s", args.model, time.monotonic() - started)
        return WhisperServer(model, args.served_model_name or args.model, os.environ.get("PILOTFISH_API_KEY") or None,
                             beam_size=args.beam_size, language=args.language)

    class Server(BaseApplication):
        def load_config(self):
            settings = {"bind": f"{args.host}:{args.port}", "workers": 1, "worker_class": "gthread",
                        "threads": args.threads, "timeout": 0, "graceful_timeout": 10, "accesslog": "-",
                        "access_log_format": '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms',
                        "control_socket_disable": True}  # one per server, not ~/.gunicorn/gunicorn.ctl for all
            if args.ssl_keyfile and args.ssl_certfile:
                settings.update(keyfile=args.ssl_keyfile, certfile=args.ssl_certfile)
            for key, value in settings.items():
                if key in self.cfg.settings:  # older gunicorn has no control socket
                    self.cfg.set(key, value)

        def load(self):
            return build_app()

    Server().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
