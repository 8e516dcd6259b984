"""A real submit / status / logs round trip against a second local Ray head (with token auth)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import _free_port, tiny_spec

BIN = Path(sys.executable).parent


def cli(*args, env=None, timeout=300):
    return subprocess.run([str(BIN / "dreambooth-ray"), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def ray_head():
    port, dash = _free_port(), _free_port()
    # Every port of its own: the session's Ray already holds the agent's default (52365), and a
    # second head whose dashboard agent cannot bind never accepts a job ("No available agent").
    agent, agent_grpc, metrics, runtime_env = (_free_port() for _ in range(4))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}", "--disable-usage-stats", "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while cli("status", "nope", "--address", address).stderr.find("no job with submission id") < 0:
        assert head.poll() is None and time.time() < deadline, "ray head did not come up"
        time.sleep(2)
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(head.pid, signal.SIGKILL)  # the head's own children (gcs, raylet, workers) share its group


def test_submit_status_logs_round_trip(ray_head, tmp_path, toy_images):
    spec = tiny_spec(str(tmp_path / "store"), str(toy_images), name="sub", prior={"enabled": False},
                     train={"steps": 2, "checkpoint_every": 2})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))

    p = cli("submit", str(job), "--address", ray_head)
    assert p.returncode == 0, p.stderr
    sid = p.stdout.strip()
    assert sid.startswith("sub-")

    again = cli("submit", str(job), "--address", ray_head)
    assert again.returncode == 2 and "already exists" in again.stderr

    # One follower instead of a polling loop: it streams the logs until the job ends.
    followed = cli("logs", sid, "--address", ray_head, "--follow", timeout=480).stdout
    status = cli("status", sid, "--address", ray_head).stdout.strip()
    logs = cli("logs", sid, "--address", ray_head).stdout
    assert status == "SUCCEEDED", logs[-3000:]
    assert "step 2/2" in logs and "samples" in logs
    assert "step 2/2" in followed and "samples" in followed
    assert (tmp_path / "store" / "outputs" / "sub" / "toy" / "job.json").exists()
    assert "already ended" in cli("stop", sid, "--address", ray_head).stderr

    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    assert token and token not in logs  # the auth token is sent, never printed


def test_wrong_token_is_a_clear_error(ray_head, tmp_path):
    bad = tmp_path / "token"
    bad.write_text("not-the-token")
    p = cli("status", "x", "--address", ray_head, "--token-file", str(bad),
            env={**os.environ, "RAY_AUTH_TOKEN": ""})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "not-the-token" not in p.stderr + p.stdout
