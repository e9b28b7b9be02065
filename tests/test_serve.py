"""`vllm serve PATH --model-impl transformers`: the CLI flag exists and the spawned engine process is
patched (the start-up hook), end to end over HTTP on localhost."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_vllm_serve_with_model_impl_transformers(smollm2_path, tmp_path):
    port = _free_port()
    vllm_cli = Path(sys.executable).parent / "vllm"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [str(vllm_cli), "serve", str(smollm2_path), "--model-impl", "transformers", "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "512", "--served-model-name", "smollm2",
         "--dtype", "float32"],  # "auto" turns float32 checkpoints into float16 (bfloat16 on the CPU)
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO"},
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while time.time() < deadline:
            if server.poll() is not None:
                pytest.fail(f"server exited with {server.returncode}: {(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("server not ready within 240 s")
        completion = _post(f"{base}/v1/completions", {"model": "smollm2", "prompt": "The capital of France is",
                                                      "max_tokens": 4, "temperature": 0})
        assert completion["choices"][0]["text"].startswith(" Paris"), completion
        chat = _post(f"{base}/v1/chat/completions", {
            "model": "smollm2", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert "Paris" in chat["choices"][0]["message"]["content"], chat
        text = (tmp_path / "server.log").read_text()
        assert "the Transformers backend (TransformersForCausalLM)" in text, text[-3000:]
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        log.close()
