"""The installed llama.cpp on a CPU older than this machine's: qemu's user-mode emulation of a Nehalem (SSE4.2, no
AVX; the oldest CPU today's Python wheels run on) runs the installed engine, which must pick the back end that CPU
has and answer correctly."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from portal.engines import installer

GENERATE = """
import sys
from llama_cpp import Llama
model = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, verbose=True)
reply = model.create_chat_completion(messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=16,
                                     temperature=0)
print("ANSWER", reply["choices"][0]["message"]["content"], flush=True)
"""


@pytest.mark.parametrize("cpu, back_end", [("Nehalem", "sse42")])
def test_llama_cpp_answers_on_an_older_cpu(engine_site, cpu, back_end):
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 is missing (tests/run.sh installs qemu-user)"
    model = installer.stage_smollm(installer.models_dir()) / installer.SMOLLM_FILE
    result = subprocess.run([qemu, "-cpu", cpu, str(installer.venv_python("llama-cpp")), "-c", GENERATE, str(model)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = re.findall(r"loaded CPU backend from (\S+)", result.stderr)
    assert loaded == [str(installer.backends_dir() / f"libggml-cpu-{back_end}.so")], result.stderr[-2000:]
    answer = result.stdout.split("ANSWER", 1)[1]
    assert re.search(r"\b4\b", answer), answer
