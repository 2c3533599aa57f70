"""`genrpc chat` as a person uses it: the interactive REPL driven through a pseudo-terminal (pexpect) against
the real stack, over OpenAI REST through Envoy (the default) and over gRPC. Two turns keep the history, /reset
forgets it, Ctrl-C stops a long answer (the service's running-requests gauge falls back to 0) and the REPL still
answers; Ctrl-D leaves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pexpect
import pytest

STATS = re.compile(r"\[(stopped|stop|length|error)(?: · (\d+) prompt \+ (\d+) completion tokens)?[^\]\r\n]*\]")
PROMPT = ">>> "
TIMEOUT_S = 180  # one answer on a loaded 2-core machine


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def ask(child: pexpect.spawn, text: str) -> tuple[str, int, int]:
    """One turn: the finish reason and the (prompt, completion) tokens from the stats line."""
    child.sendline(text)
    child.expect(STATS, timeout=TIMEOUT_S)
    finish, prompt_tokens, completion_tokens = child.match.groups()
    assert finish in ("stop", "length"), child.before
    child.expect_exact(PROMPT)
    return finish, int(prompt_tokens), int(completion_tokens)


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_chat_repl(stack, transport, tmp_path):
    argv = ["-m", "genrpc.cli", "chat", "--envoy-port", str(stack.ports["envoy_port"]),
            "--grpc-port", str(stack.ports["grpc_port"]), "--max-tokens", "16", "--temperature", "0"]
    if transport == "grpc":
        argv.append("--grpc")
    transcript = tmp_path / f"chat-{transport}.txt"
    with open(transcript, "w", encoding="utf-8") as log:
        child = pexpect.spawn(sys.executable, argv, env={**os.environ, "TERM": "dumb"}, encoding="utf-8",
                              timeout=60, dimensions=(40, 120))
        child.logfile_read = log
        try:
            child.expect_exact(PROMPT)

            # two turns: the second request carries the first question and answer
            _, first_prompt, first_completion = ask(child, "What is the capital of France?")
            _, second_prompt, _ = ask(child, "And what about Germany?")
            assert second_prompt > first_prompt + first_completion

            # /reset: the same question alone is a much shorter prompt
            child.sendline("/reset")
            child.expect_exact("(conversation cleared)")
            child.expect_exact(PROMPT)
            _, alone_prompt, _ = ask(child, "And what about Germany?")
            assert alone_prompt < second_prompt

            # Ctrl-C in the middle of a long answer stops it on the server too; the REPL stays
            wait_for(lambda: stack.running_requests() == 0, 30, "an idle engine")
            child.sendline("/set max_tokens 2000")
            child.expect_exact("(max_tokens = 2000)")
            child.expect_exact(PROMPT)
            child.sendline("Write a long story about a dragon who learns to cook.")
            child.expect_exact("cook.\r\n")  # the echoed line
            child.expect(r"\w+\W+\w+\W+\w+", timeout=TIMEOUT_S)  # a few streamed words
            assert stack.running_requests() == 1
            child.sendintr()
            child.expect(STATS, timeout=30)
            assert child.match.group(1) == "stopped"
            child.expect_exact(PROMPT)
            wait_for(lambda: stack.running_requests() == 0, 15, "genrpc_running_requests back to 0 after Ctrl-C")

            child.sendline("/set max_tokens 16")
            child.expect_exact(PROMPT)
            ask(child, "What is the capital of Italy?")

            child.sendeof()  # Ctrl-D leaves
            child.expect(pexpect.EOF, timeout=30)
        finally:
            child.close(force=True)
    assert child.exitstatus == 0, transcript.read_text()
    print(transcript.read_text())


def test_chat_one_shot_over_rest(stack):
    """`genrpc chat "…"` for scripts: the answer alone on stdout, the stats on stderr, exit 0."""
    result = subprocess.run([sys.executable, "-m", "genrpc.cli", "chat",
                             "--envoy-port", str(stack.ports["envoy_port"]), "--max-tokens", "8",
                             "--temperature", "0", "What is the capital of France?"],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "[" not in result.stdout
    match = STATS.search(result.stderr)
    assert match and match.group(1) in ("stop", "length") and 0 < int(match.group(3)) <= 8, result.stderr
