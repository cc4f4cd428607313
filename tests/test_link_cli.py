"""The link's commands as a user runs them: `board-sim` in one process, `install`, `chat` and
`serve` in others, over loopback sockets and ptys; and one clear line for each port problem."""
from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
import tty

import pytest

from conftest import REPO, fixture_path, free_port, run_cli
from test_link_rig import stream_bytes, synth_model


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("link") / "model.rwks"
    path.write_bytes(stream_bytes(synth_model()))
    return path


@pytest.fixture
def board_sim(tmp_path):
    procs = []

    def start(*extra):
        port = free_port()
        p = subprocess.Popen([sys.executable, "-m", "host.cli", "board-sim", "--port",
                              f"socket://127.0.0.1:{port}", *map(str, extra)], cwd=REPO,
                             stderr=subprocess.PIPE)
        procs.append(p)
        line = p.stderr.readline().decode()
        assert "ready" in line, line
        return f"socket://127.0.0.1:{port}"
    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


def test_install_then_chat_through_the_cli(board_sim, stream_file, tmp_path):
    url = board_sim("--board", "esp32s3", "--flash", tmp_path / "flash.bin")
    r = run_cli("install", stream_file, "--port", url, "--json", check_status=0)
    assert b'"resumed_from": 0' in r.stdout
    r = run_cli("install", stream_file, "--port", url, check_status=0)     # already there
    assert b"resumed at byte" in r.stderr
    r = run_cli("chat", "--port", url, "--prompt", "Hi", "-n", "5", "--json", check_status=0)
    assert b'"generated"' in r.stdout


def test_serve_live_through_the_cli_matches_run(board_sim, stream_file):
    url = board_sim()
    r = run_cli("serve", stream_file, "--port", url, "--prompt-tokens", "1,2,3", "-n", "4",
                "--json", check_status=0)
    import json
    served = json.loads(r.stdout)["results"][0]["generated"]
    r = run_cli("run", stream_file, "--prompt-tokens", "1,2,3", "-n", "4", "--json",
                check_status=0)
    assert served == json.loads(r.stdout)["generated"]


def test_board_without_the_type_refuses_with_one_line(board_sim, stream_file):
    url = board_sim("--types", "F32,F16")
    r = run_cli("serve", stream_file, "--port", url, "--prompt", "x", check_status=2)
    line = r.stderr.decode().strip()
    assert "\n" not in line and "does not implement Q8_0" in line


def test_board_profile_checked_before_the_port_is_opened():
    src = fixture_path("rwkv_cpp", "tiny-rwkv-4v0-660K-FP16.bin")
    r = run_cli("serve", src, "--quant", "BF16", "--port", "/dev/nonexistent-tty", "--board",
                "rp2040", "--prompt", "x", check_status=2)
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "does not implement BF16" in err


def test_missing_port_is_one_line(stream_file):
    r = run_cli("install", stream_file, "--port", "/dev/ttyDOESNOTEXIST", check_status=2)
    assert r.stderr.decode().count("\n") == 1 and b"no such port" in r.stderr


def test_refused_socket_is_one_line(stream_file):
    r = run_cli("install", stream_file, "--port", f"socket://127.0.0.1:{free_port()}",
                check_status=2)
    assert r.stderr.decode().count("\n") == 1 and b"connection refused" in r.stderr


def _pty():
    master, slave = os.openpty()
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)


def test_no_answer_is_one_line(stream_file):
    master, slave, path = _pty()
    try:
        r = run_cli("install", stream_file, "--port", path, check_status=2)
    finally:
        os.close(master)
        os.close(slave)
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "no rwkv-stream board answered" in err


def test_garbage_is_one_line(stream_file):
    master, slave, path = _pty()
    stop = threading.Event()

    def babble():
        while not stop.is_set():
            try:
                os.write(master, b"ets Jun  8 2016 00:22:57\r\nrst:0x1 boot:0x13\x00\xff\x12" * 4)
                while select.select([master], [], [], 0)[0]:
                    os.read(master, 4096)        # what the host sends goes nowhere
            except OSError:
                return
            time.sleep(0.02)
    t = threading.Thread(target=babble, daemon=True)
    t.start()
    try:
        r = run_cli("install", stream_file, "--port", path, check_status=2)
    finally:
        stop.set()
        t.join()
        os.close(master)
        os.close(slave)
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "garbage" in err, err


def test_busy_port_is_one_line(stream_file):
    import serial
    master, slave, path = _pty()
    holder = serial.Serial(path, exclusive=True)
    try:
        r = run_cli("install", stream_file, "--port", path, check_status=2)
    finally:
        holder.close()
        os.close(master)
        os.close(slave)
    assert r.stderr.decode().count("\n") == 1 and b"busy" in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any device: no permission error "
                                              "to provoke")
def test_no_permission_is_one_line(stream_file, tmp_path):
    master, slave, path = _pty()
    os.chmod(path, 0o000)
    try:
        r = run_cli("install", stream_file, "--port", path, check_status=2)
    finally:
        os.close(master)
        os.close(slave)
    assert b"permission denied" in r.stderr
