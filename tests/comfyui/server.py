"""A real ComfyUI server for the in-ComfyUI tests: ComfyUI's own ``main.py`` on CPU in a throw-away base directory
with this pack symlinked into ``custom_nodes`` (nothing else is loaded) and the tiny checkpoint as
``models/ovis_u1/Ovis-U1-3B``. Prompts go through ``POST /prompt`` and ComfyUI's executor exactly as the frontend's
do; what comes back is the websocket stream (progress, previews, execution events), ``/history`` and the server log.

Driving the server (not ``execution.PromptExecutor`` in-process) is what works unchanged from ComfyUI 0.3.64 to
0.18.1: the HTTP/websocket API is stable, while the executor's constructor, its async API and the start-up sequence
(custom-node loading, prompt worker, progress hooks) differ between them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.comfyui import layers

PACK_DIR_NAME = "ComfyUI-Ovis-U1"
MODEL_FOLDER = "Ovis-U1-3B"
DONE_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


@dataclass
class Run:
    """One prompt's execution as a client sees it."""

    prompt_id: str
    status: str  # "success", "error" or "interrupted" (the last execution event)
    messages: list[dict]  # the JSON websocket messages for this prompt, in order
    previews: int  # binary websocket frames (latent previews) received while it ran
    history: dict  # /history/<prompt_id>
    log: str  # what the server logged while it ran

    def of_type(self, kind: str) -> list[dict]:
        return [m["data"] for m in self.messages if m["type"] == kind]

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})

    @property
    def error(self) -> dict | None:
        errors = self.of_type("execution_error")
        return errors[0] if errors else None

    def explain(self) -> str:
        """What to print when a run did not go as expected."""
        error = self.error
        if error:
            return (f"{error.get('node_type')} (node {error.get('node_id')}) raised {error.get('exception_type')}: "
                    f"{error.get('exception_message')}\n{''.join(error.get('traceback') or [])}")
        return f"status {self.status}; server log:\n{self.log[-4000:]}"


@dataclass
class ComfyServer:
    comfyui: Path  # the ComfyUI source tree
    base: Path  # --base-directory
    pack: Path  # this repository
    checkpoint: Path
    python: str = sys.executable
    # pytorch attention: ComfyUI's CPU default (sub-quadratic) orders the sums differently from the official SDPA
    extra_args: list[str] = field(default_factory=lambda: ["--preview-method", "latent2rgb",
                                                           "--use-pytorch-cross-attention"])
    port: int = 0
    process: subprocess.Popen | None = None

    # ------------------------------------------------------------------------------------------ start / stop
    def prepare(self) -> None:
        for sub in ("custom_nodes", "models/ovis_u1", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "custom_nodes" / PACK_DIR_NAME).symlink_to(self.pack, target_is_directory=True)
        (self.base / "models" / "ovis_u1" / MODEL_FOLDER).symlink_to(self.checkpoint, target_is_directory=True)
        if layers.LAZY:
            node = self.base / "custom_nodes" / layers.LAZY_LAYERS_NODE_DIR
            node.mkdir()
            (node / "__init__.py").write_text(layers.LAZY_LAYERS_NODE.format(path=str(Path(layers.__file__).resolve())))

    def add_input(self, source: Path, name: str) -> str:
        """Put an image in ComfyUI's input folder (what LoadImage lists) and return its name."""
        shutil.copyfile(source, self.base / "input" / name)
        return name

    def start(self, timeout: float = 300.0) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base), "--disable-auto-launch", *self.extra_args]
        if "--database-url" in (self.comfyui / "comfy" / "cli_args.py").read_text():  # 0.18: keep its DB out of the tree
            args += ["--database-url", "sqlite:///:memory:"]
        self.log_path = self.base / "server.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(args, cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-6000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()[-6000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log(self, since: int = 0) -> str:
        return self.log_path.read_bytes()[since:].decode("utf-8", "replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    # ----------------------------------------------------------------------------------------------- HTTP
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> dict | None:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                data = r.read()
        except urllib.error.HTTPError as e:  # /prompt answers 400 with the validation errors
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode('utf-8', 'replace')}") from None
        return json.loads(data) if data.strip() else None

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    # -------------------------------------------------------------------------------------------- prompts
    def run(self, prompt: dict, on_message=None, timeout: float = 900.0) -> Run:
        """Queue an API-format prompt as the frontend does (with a client id, so progress comes over the websocket)
        and wait for it to end. ``on_message(server, message)`` sees every JSON message as it arrives."""
        import asyncio

        return asyncio.run(self._run(prompt, on_message, timeout))

    async def _run(self, prompt: dict, on_message, timeout: float) -> Run:
        import aiohttp  # one of ComfyUI's requirements

        client_id = uuid.uuid4().hex
        log_start = self.log_size()
        messages, previews = [], 0
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}", max_msg_size=0) as ws:
                async with session.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                    answer = await r.json(content_type=None)
                    if r.status != 200 or answer.get("node_errors"):
                        raise AssertionError(f"ComfyUI refused the prompt ({r.status}): {json.dumps(answer, indent=1)}")
                prompt_id = answer["prompt_id"]
                status = None
                deadline = time.monotonic() + timeout
                while status is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.interrupt()
                        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n"
                                             f"{self.log(log_start)[-4000:]}")
                    message = await ws.receive(timeout=left)
                    if message.type == aiohttp.WSMsgType.BINARY:
                        previews += 1
                        continue
                    if message.type != aiohttp.WSMsgType.TEXT:
                        raise AssertionError(f"websocket closed ({message.type}):\n{self.log(log_start)[-4000:]}")
                    data = json.loads(message.data)
                    if (data.get("data") or {}).get("prompt_id") not in (None, prompt_id):
                        continue
                    messages.append(data)
                    if on_message is not None:
                        on_message(self, data)
                    if data["type"] in DONE_EVENTS and data["data"].get("prompt_id") == prompt_id:
                        status = data["type"].removeprefix("execution_")
        history = await self._history(prompt_id)
        return Run(prompt_id, status, messages, previews, history, self.log(log_start))

    async def _history(self, prompt_id: str) -> dict:
        import asyncio

        for _ in range(100):  # the history entry is written just after the last websocket event
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            await asyncio.sleep(0.1)
        raise AssertionError(f"no /history entry for {prompt_id}")

    def output_file(self, image: dict) -> Path:
        """The file behind a SaveImage/PreviewImage history entry ({filename, subfolder, type})."""
        return self.base / image["type"] / image.get("subfolder", "") / image["filename"]
