"""faster-whisper: speech recognition from CTranslate2 Whisper models, served by the portal's own OpenAI-compatible
server (portal/engines/whisper_server.py), which reads its key from PILOTFISH_API_KEY (set for every job)."""
from __future__ import annotations

from .base import Engine, EngineInstall

FLAGS = frozenset({"--compute-type", "--beam-size", "--language", "--device", "--cpu-threads"})

INSTALL = EngineInstall(
    name="whisper", title="Whisper server (faster-whisper)",
    packages=["faster-whisper==1.2.1", "werkzeug>=3", "gunicorn>=22"],
    size_note="about 150 MB",
    module="faster_whisper",
    script="portal/engines/whisper_server.py",
)

ENGINE = Engine(
    name="whisper", title="faster-whisper", kinds=("speech-recognition",), formats=("ctranslate2",),
    health_path="/health",
    native_command="python -m portal.engines.whisper_server",
    container_command="python3 -m portal.engines.whisper_server",
    allowed_flags=FLAGS, install=INSTALL,
)
