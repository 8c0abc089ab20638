"""`chatserve chat` holds a conversation through the gateway (stdin scripted)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_terminal_chat_answers_and_keeps_history(platform):
    script = "What is the capital of France?\n/reset\n/exit\n"
    r = subprocess.run([sys.executable, "-m", "chatserve.cli.main", "chat", "--api-url", platform.api_url,
                        "--temperature", "0", "--max-tokens", "24"], input=script, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"chatting with {platform.model}" in r.stdout
    assert "Paris" in r.stdout and "(history cleared)" in r.stdout
