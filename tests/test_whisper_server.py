"""The Whisper server's request handling with a stand-in model (the real model runs in tests/e2e)."""
from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from werkzeug.test import Client

from portal.engines.whisper_server import WhisperServer, subtitles


class RecordingModel:
    def __init__(self):
        self.calls = []

    def transcribe(self, path, **options):
        with open(path, "rb") as handle:
            self.calls.append((handle.read(), options))
        segments = [SimpleNamespace(id=1, seek=0, start=0.0, end=1.5, text=" Hello there.", tokens=[1, 2],
                                    temperature=0.0, avg_logprob=-0.2, compression_ratio=1.1, no_speech_prob=0.01),
                    SimpleNamespace(id=2, seek=0, start=1.5, end=3661.25, text=" Bye.", tokens=[3],
                                    temperature=0.0, avg_logprob=-0.3, compression_ratio=1.0, no_speech_prob=0.02)]
        return iter(segments), SimpleNamespace(language="en", duration=3661.25)


@pytest.fixture
def server():
    model = RecordingModel()
    return model, Client(WhisperServer(model, "org/whisper", "k3y", beam_size=2))


def post(client, key="k3y", **fields):
    data = {"model": "org/whisper", "file": (io.BytesIO(b"RIFF....WAVE"), "talk.wav")}
    data.update(fields)
    return client.post("/v1/audio/transcriptions", data={k: v for k, v in data.items() if v is not None},
                       headers={"Authorization": f"Bearer {key}"} if key else {})


def test_transcription_formats(server):
    model, client = server
    assert post(client).json == {"text": "Hello there. Bye."}
    assert model.calls[0][0] == b"RIFF....WAVE" and model.calls[0][1]["task"] == "transcribe"
    assert model.calls[0][1]["beam_size"] == 2
    verbose = post(client, response_format="verbose_json", language="en", prompt="names").json
    assert (verbose["language"], verbose["duration"], len(verbose["segments"])) == ("en", 3661.25, 2)
    assert model.calls[1][1]["language"] == "en" and model.calls[1][1]["initial_prompt"] == "names"
    assert post(client, response_format="text").get_data(as_text=True) == "Hello there. Bye.\n"
    assert post(client, response_format="srt").get_data(as_text=True) == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n00:00:01,500 --> 01:01:01,250\nBye.\n")
    assert post(client, response_format="vtt").get_data(as_text=True).startswith("WEBVTT\n\n00:00:00.000 --> ")
    translated = client.post("/v1/audio/translations", data={"model": "org/whisper",
                                                             "file": (io.BytesIO(b"x"), "a.wav")},
                             headers={"Authorization": "Bearer k3y"})
    assert translated.status_code == 200 and model.calls[-1][1]["task"] == "translate"


@pytest.mark.parametrize("fields, status, param", [
    ({"file": None}, 400, "file"),
    ({"model": None}, 400, "model"),
    ({"model": "other/model"}, 404, "model"),
    ({"response_format": "xml"}, 400, "response_format"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"temperature": "3"}, 400, "temperature"),
])
def test_bad_requests_get_openai_shaped_errors(server, fields, status, param):
    model, client = server
    response = post(client, **fields)
    assert response.status_code == status
    assert response.json["error"]["param"] == param and response.json["error"]["message"]
    assert model.calls == []


def test_key_is_required_on_every_path(server):
    model, client = server
    for key in (None, "wrong"):
        response = post(client, key=key)
        assert response.status_code == 401 and response.json["error"]["code"] == "invalid_api_key"
    headers = {"Authorization": "Bearer wrong"}
    for path in ("/health", "/v1/models", "/v1/nothing", "/", "/docs", "/metrics"):
        for method in ("GET", "POST", "DELETE", "OPTIONS"):
            assert client.open(path, method=method).status_code == 401, (method, path)
            assert client.open(path, method=method, headers=headers).status_code == 401, (method, path)
    assert model.calls == []
    assert client.get("/health", headers={"Authorization": "Bearer k3y"}).status_code == 200
    models = client.get("/v1/models", headers={"Authorization": "Bearer k3y"}).json
    assert [m["id"] for m in models["data"]] == ["org/whisper"]
    assert client.get("/v1/nothing", headers={"Authorization": "Bearer k3y"}).status_code == 404
    assert client.get("/v1/audio/transcriptions", headers={"Authorization": "Bearer k3y"}).status_code == 405


def test_subtitles_number_and_time_each_segment():
    segments = [{"start": 0.0, "end": 0.5, "text": " a "}, {"start": 59.9996, "end": 61.0, "text": "b"}]
    assert subtitles(segments, "srt") == "1\n00:00:00,000 --> 00:00:00,500\na\n\n2\n00:01:00,000 --> 00:01:01,000\nb\n"


def test_subtitles_keep_each_cue_whole_and_leave_out_segments_without_words():
    segments = [{"start": 0.0, "end": 1.0, "text": " first\n\nline "}, {"start": 1.0, "end": 2.0, "text": "  "},
                {"start": 2.0, "end": 3.25, "text": "a --> b"}]
    assert subtitles(segments, "srt") == ("1\n00:00:00,000 --> 00:00:01,000\nfirst line\n\n"
                                          "2\n00:00:02,000 --> 00:00:03,250\na -> b\n")
    assert subtitles(segments, "vtt") == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nfirst line\n\n"
                                          "00:00:02.000 --> 00:00:03.250\na -> b\n")
    assert subtitles([], "srt") == "" and subtitles([], "vtt") == "WEBVTT\n\n"


def test_every_response_format_a_folder_writes(server):
    _, client = server
    assert post(client, response_format="json").json == {"text": "Hello there. Bye."}
    assert post(client, response_format="text").get_data(as_text=True) == "Hello there. Bye.\n"
    assert post(client, response_format="srt").get_data(as_text=True) == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n00:00:01,500 --> 01:01:01,250\nBye.\n")
    assert post(client, response_format="vtt").get_data(as_text=True) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n00:00:01.500 --> 01:01:01.250\nBye.\n")
