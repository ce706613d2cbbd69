"""What the Open OnDemand dashboard does with the app, for the tests: render its ERB with Ruby (tests/ood/render.rb),
stage and submit a session with the job wrapper OOD generates, and proxy /node/<host>/<port>/ to the session.

The wrapper follows ood_core's OodCore::BatchConnect::Template ("basic"): cd to the staged folder, export `host`
and `port`, define the helpers (find_port, create_passwd, ...), source before.sh, fork script.sh, source after.sh,
write connection.yml (host, port, password; umask 077), wait for script.sh, clean up. The Slurm adapter submits it
on stdin with `#!/bin/bash` prepended and --export=NONE.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional

import requests
import yaml

from tests.conftest import REPO

RENDER = Path(__file__).resolve().parent / "render.rb"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "content-length", "host"}


class RenderError(Exception):
    """Ruby raised while rendering: what the dashboard would show the user."""


def ruby_render(requests_: List[dict]) -> List[dict]:
    """Render several files in one Ruby process; each result is {"result": ...} or {"error": "Class: message"}."""
    done = subprocess.run(["ruby", str(RENDER)], input=json.dumps(requests_), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr  # no Ruby warnings either
    return json.loads(done.stdout)


def one(request: dict):
    answer = ruby_render([request])[0]
    if "error" in answer:
        raise RenderError(answer["error"])
    return answer["result"]


def render_form(env: Dict[str, Optional[str]]) -> dict:
    return one({"kind": "form", "path": str(REPO / "form.yml.erb"), "env": env})


def render_submit(env: Dict[str, Optional[str]], values: dict, staged_root: str = "/tmp/staged") -> dict:
    return one({"kind": "submit", "path": str(REPO / "submit.yml.erb"), "env": env, "context": values,
                "staged_root": staged_root})


def form_values(form: dict, **chosen) -> dict:
    """The values a browser would post: each attribute's `value` (fixed ones included), then the user's choices."""
    values = {}
    for name in form["form"]:
        spec = form["attributes"].get(name, {})
        if not isinstance(spec, dict):
            values[name] = str(spec)
        elif "value" in spec:
            values[name] = str(spec["value"])
        elif spec.get("options"):
            values[name] = str(spec["options"][0][1])
        else:
            values[name] = ""
    values.update({key: str(value) for key, value in chosen.items()})
    return values


def stage(staged_root: Path, values: dict) -> List[Path]:
    """Copy template/ as `rsync -a` does (modes kept), render every .erb into the file without the extension."""
    shutil.copytree(REPO / "template", staged_root, dirs_exist_ok=True)
    erbs = sorted(staged_root.glob("**/*.erb"))
    answers = ruby_render([{"kind": "template", "path": str(path), "context": values, "staged_root": str(staged_root)}
                           for path in erbs])
    rendered = []
    for path, answer in zip(erbs, answers):
        if "error" in answer:
            raise RenderError(f"{path.name}: {answer['error']}")
        target = path.with_suffix("")
        path.rename(target)  # keeps the file's mode, as the dashboard does
        target.write_text(answer["result"])
        rendered.append(target)
    return rendered


def render_view(connection_yml: Path) -> str:
    return one({"kind": "view", "path": str(REPO / "view.html.erb"), "connection": str(connection_yml)})


JOB_TEMPLATE = r"""#!/bin/bash
{header}
cd {work_dir}

# Export useful connection variables
export host
export port

# Generate a connection yaml file with given parameters
create_yml () {{
  echo "Generating connection YAML file..."
  (
    umask 077
    echo -e "host: $host\nport: $port\npassword: $password" > "{work_dir}/connection.yml"
  )
}}

# Cleanliness is next to Godliness
clean_up () {{
  echo "Cleaning up..."
  [[ -e "{work_dir}/clean.sh" ]] && source "{work_dir}/clean.sh"
  [[ ${{SCRIPT_PID}} ]] && pkill -P ${{SCRIPT_PID}} || :
  pkill -P $$
  exit ${{1:-0}}
}}

# Source in all the helper functions
source_helpers () {{
  random_number () {{
    shuf -i ${{1}}-${{2}} -n 1
  }}
  export -f random_number

  port_used () {{
    local port="${{1#*:}}"
    local host=$((expr "${{1}}" : '\\(.*\\):' || echo "localhost") | awk 'END{{print $NF}}')
    nc -w 2 "${{host}}" "${{port}}" < /dev/null &> /dev/null
  }}
  export -f port_used

  find_port () {{
    local host="${{1:-localhost}}"
    local port=$(random_number "${{2:-2000}}" "${{3:-65535}}")
    while port_used "${{host}}:${{port}}"; do
      port=$(random_number "${{2:-2000}}" "${{3:-65535}}")
    done
    echo "${{port}}"
  }}
  export -f find_port

  wait_until_port_used () {{
    local port="${{1}}"
    local time="${{2:-30}}"
    for ((i=1; i<=time*2; i++)); do
      if port_used "${{port}}"; then
        return 0
      fi
      sleep 0.5
    done
    return 1
  }}
  export -f wait_until_port_used

  create_passwd () {{
    tr -cd '[:alnum:]' < /dev/urandom 2> /dev/null | head -c${{1:-32}}
  }}
  export -f create_passwd
}}
export -f source_helpers

source_helpers

# Set host of current machine
host=$(hostname)

[[ -e "{work_dir}/before.sh" ]] && source "{work_dir}/before.sh"

echo "Script starting..."
"{work_dir}/script.sh" &
SCRIPT_PID=$!

[[ -e "{work_dir}/after.sh" ]] && source "{work_dir}/after.sh"

# Create the connection yaml file
create_yml

# Wait for script process to finish
wait ${{SCRIPT_PID}} || clean_up 1

# Exit cleanly
clean_up
"""


def job_script(work_dir: Path, header: str = "") -> str:
    return JOB_TEMPLATE.format(work_dir=work_dir, header=header)


def submit(work_dir: Path, submit_yml: dict, header: str = "", extra: List[str] = ()) -> str:
    """sbatch the session as ood_core's Slurm adapter does: script on stdin, --export=NONE, native args last."""
    args = ["sbatch", "--parsable", "--export=NONE", f"--job-name=sys/dashboard/sys/pilotfish",
            f"--chdir={work_dir}", f"--output={work_dir / 'output.log'}",
            *submit_yml["script"]["native"], *extra]
    done = subprocess.run(args, input=job_script(work_dir, header), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def connection(work_dir: Path) -> Optional[dict]:
    path = work_dir / "connection.yml"
    return yaml.safe_load(path.read_text()) if path.exists() else None


class OodFront:
    """The OOD web server, reduced to what a session card needs: the page with the rendered view, and the
    /node/<host>/<port>/... reverse proxy that forwards the full path (OOD's `node` proxy)."""

    SESSIONS = "/pun/sys/dashboard/batch_connect/sessions"

    def __init__(self, view_html: str):
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, status: int, body: bytes, headers: Dict[str, str]):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self):
                if self.path.startswith("/node/"):
                    return self._proxy()
                if self.path == front.SESSIONS:
                    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>My Interactive Sessions"
                            f"</title><link rel='icon' href='data:,'></head><body><h1>Pilotfish</h1>"
                            f"{front.view_html}</body></html>")
                    return self._send(200, page.encode(), {"Content-Type": "text/html; charset=utf-8"})
                return self._send(404, b"not found", {"Content-Type": "text/plain"})

            def _proxy(self):
                parts = self.path.split("/", 4)  # "", "node", host, port, rest
                host, port = parts[2], parts[3]
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {key: value for key, value in self.headers.items() if key.lower() not in HOP_BY_HOP}
                upstream = requests.request(self.command, f"http://{host}:{port}{self.path}", headers=headers,
                                            data=body, allow_redirects=False, timeout=30, stream=True)
                try:
                    self.send_response(upstream.status_code)
                    for key, value in upstream.raw.headers.items():  # Set-Cookie may repeat
                        if key.lower() not in HOP_BY_HOP:
                            self.send_header(key, value)
                    length = upstream.headers.get("Content-Length")
                    if length is None:  # a stream: it ends when the connection closes
                        self.close_connection = True
                        self.send_header("Connection", "close")
                    else:
                        self.send_header("Content-Length", length)
                    self.end_headers()
                    for chunk in upstream.raw.stream(8192, decode_content=False):
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the browser went away
                finally:
                    upstream.close()

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, *args):
                pass

        self.view_html = view_html
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
