"""Board profiles, `plan`, tokenizers, sampling, stop strings."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import fp32_model, run_cli
from firmware_sim.board import Board
from firmware_sim.profiles import PROFILES, get_profile
from formats.errors import BadInput, UsageError
from host.plan_cmd import plan
from host.run_cmd import open_source
from host.sampling import Sampler
from host.tokenizers import ByteTokenizer, StreamingDecoder, get_tokenizer


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_loads_and_plans(name):
    board = get_profile(name)
    assert board.sram > 0 and board.flash > 0 and board.links
    r = plan(fp32_model("7v0-834K"), board, "Q4_0")
    needed = r["ram_needed"]
    assert r["fits"] == (needed <= board.sram + board.psram)


def test_user_profile_files(tmp_path):
    toml = tmp_path / "myboard.toml"
    toml.write_text('name = "myboard"\nsram = 100000\nflash = 4000000\nclock_mhz = 48\n'
                    'flash_read = 1e6\n[links]\nusb-fs = 6e5\n')
    board = get_profile(str(toml))
    assert board.name == "myboard" and board.links == {"usb-fs": 6e5}
    js = tmp_path / "b.json"
    js.write_text(json.dumps(dict(name="b", sram=1 << 20, flash=1 << 20, clock_mhz=100)))
    assert get_profile(str(js)).sram == 1 << 20
    js.write_text(json.dumps(dict(name="b", sram=1, flash=1, clock_mhz=1, color="red")))
    with pytest.raises(BadInput, match="color"):
        get_profile(str(js))
    with pytest.raises(BadInput, match="unknown board"):
        get_profile("z80")


def test_plan_bytes_per_token_equal_a_measured_run():
    src = fp32_model("6v0-3m")
    r = plan(src, get_profile("esp32s3"), "Q5_1")
    source = open_source(src, "Q5_1")
    board = Board(source)
    start = source.bytes_read
    for t in b"abc":
        board.eval(t)
    assert (source.bytes_read - start) / 3 == r["bytes_per_token"]
    assert r["ram_needed"] == board.ram_needed
    link = r["tokens_per_second"]["link usb-fs"]
    assert link == round(0.6e6 / r["bytes_per_token"], 3)


def test_plan_cli_exit_status_and_overrides():
    src = fp32_model("7v0-834K")
    proc = run_cli("plan", src, "--board", "rp2040", "--quant", "Q4_0", "--json", check_status=0)
    r = json.loads(proc.stdout)
    assert r["fits"] and r["storage"] == "install into flash"
    proc = run_cli("plan", src, "--board", "rp2040", "--ram", "50000", "--json")
    assert proc.returncode == 1 and not json.loads(proc.stdout)["fits"]
    proc = run_cli("plan", src, "--board", "nrf52840", "--flash", "1000", "--json",
                   check_status=0)
    assert json.loads(proc.stdout)["storage"].startswith("stream live")


def test_byte_tokenizer_round_trip_and_streaming_utf8():
    t = ByteTokenizer()
    text = "héllo wörld ✓"
    ids = t.encode(text)
    assert t.decode_bytes(ids).decode() == text
    dec = StreamingDecoder(t)
    pieces = [dec.push(i) for i in ids]
    assert b"".join(pieces).decode() == text
    assert b"" in pieces          # the multi-byte characters were held back until complete


def test_world_tokenizer_round_trip():
    pytest.importorskip("pyrwkv_tokenizer")
    t = get_tokenizer(65536)
    text = "RWKV on a microcontroller: 你好, world!"
    ids = t.encode(text)
    assert len(ids) < len(text.encode()) and t.decode_bytes(ids).decode() == text


def test_tokenizer_choice_errors():
    with pytest.raises(UsageError, match="20B"):
        get_tokenizer(50277)
    with pytest.raises(UsageError, match="--prompt-tokens"):
        get_tokenizer(1234)


def test_sampler():
    logits = np.array([0.0, 3.0, 1.0, 2.9], np.float32)
    assert Sampler(0.0)(logits) == 1
    assert Sampler(1.0, top_k=1)(logits) == 1
    assert Sampler(1.0, top_p=0.01, seed=3)(logits) == 1
    draws = [Sampler(1.0, seed=s)(logits) for s in range(200)]
    assert set(draws) == {0, 1, 2, 3}
    assert [Sampler(1.0, seed=7)(logits) for _ in range(3)] == [Sampler(1.0, seed=7)(logits)] * 3
    top2 = {Sampler(5.0, top_k=2, seed=s)(logits) for s in range(100)}
    assert top2 == {1, 3}


def test_run_stops_at_stop_string():
    src = fp32_model("5v2-730K")
    proc = run_cli("run", src, "--prompt", "The quick brown", "-n", "200", "--json",
                   check_status=0)
    text = json.loads(proc.stdout)["text"]
    stop = text[5:8]
    proc = run_cli("run", src, "--prompt", "The quick brown", "-n", "200", "--stop", stop,
                   "--json", check_status=0)
    r = json.loads(proc.stdout)
    assert r["stopped_at"] == stop and r["text"].endswith(stop) and len(r["text"]) <= 8


def test_plan_sequence_figure_equals_a_measured_sequence_run():
    src = fp32_model("5v2-730K")
    board_profile = get_profile("rp2040").with_overrides(ram=150000)
    r = plan(src, board_profile, "Q4_0")
    k = r["sequence_tokens_per_pass"]
    assert k > 1
    source = open_source(src, "Q4_0")
    board = Board(source, ram=150000, columns=k)
    start = source.bytes_read
    board.eval_sequence(list(range(65, 65 + k)))
    assert source.bytes_read - start == r["bytes_per_prompt_token"] * k


def test_run_batch_file_equals_separate_runs(tmp_path):
    src = fp32_model("5v2-730K")
    prompts = ["The quick brown", "Hello", "Once upon a time"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    proc = run_cli("run", src, "--batch-file", tmp_path / "p.txt", "-n", "6", "--quant", "Q8_0",
                   "--json", check_status=0)
    r = json.loads(proc.stdout)
    assert r["batch"] == 3 and r["passes"] == len(prompts[2]) + 6 - 1
    for prompt, text in zip(prompts, r["texts"]):
        one = json.loads(run_cli("run", src, "--prompt", prompt, "-n", "6", "--quant", "Q8_0",
                                 "--json", check_status=0).stdout)
        assert one["text"] == text
