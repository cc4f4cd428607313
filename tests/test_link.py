"""The serial link end to end on real ports: a pty pair and loopback sockets, through the
fault-injecting relay. Every run ends with logits bit-identical to the same model read from a
file, or with a clear error after the retry budget."""
from __future__ import annotations

import time
import zlib
from collections import Counter

import numpy as np
import pytest

from conftest import LINK_FAULTS, fixture_path
from firmware_sim.board import Board
from firmware_sim.link_board import FLASH_DATA
from formats.errors import BadInput
from host.link.framing import BoardError, LinkError
from host.link.host import HostSession
from host.link.relay import Faults
from host.run_cmd import open_source
from test_link_rig import FAST, Rig, reference_logits, stream_bytes, synth_model, virtual_source

TOKENS = [72, 101, 108, 108, 111]
FAULT_TALLY = Counter()


@pytest.fixture(scope="module")
def model():
    return synth_model()


@pytest.fixture(scope="module")
def data(model):
    return stream_bytes(model)


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    if not FAULT_TALLY:
        return
    line = (f"serial link fault cases: {FAULT_TALLY['cases']} runs, {FAULT_TALLY['injected']} "
            "faults injected (" + ", ".join(f"{k} {v}" for k, v in sorted(FAULT_TALLY.items())
                                            if k not in ("cases", "injected")) + ")")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n" + line)


def tally(rig):
    FAULT_TALLY["cases"] += 1
    for r in rig.relays:
        for k, v in r.counts.items():
            FAULT_TALLY[k] += v
            FAULT_TALLY["injected"] += v


def live_logits(rig, model, tokens=TOKENS, n_gen=2):
    with HostSession(rig.url, timeouts=FAST) as h:
        h.hello()
        h.live(virtual_source(model))
        gen = h.eval(tokens, n_gen)
        return gen, h.logits(), h


def install_then_run(rig, model, tokens=TOKENS, n_gen=2):
    with HostSession(rig.url, timeouts=FAST) as h:
        h.hello()
        result = h.install(virtual_source(model))
        h.hello()
        h.run_flash()
        h.reset()
        gen = h.eval(tokens, n_gen)
        return gen, h.logits(), result


def expected(data, tokens, gen):
    return reference_logits(data, list(tokens) + list(gen))


# -- clean cables ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pty", "socket"])
def test_live_over_a_clean_port_matches_the_file(kind, model, data):
    with Rig(kind) as rig:
        gen, logits, h = live_logits(rig, model)
        assert np.array_equal(logits, expected(data, TOKENS, gen))
        # a clean cable corrupts nothing (a slow board under load may still cost a timeout
        # retransmission, which is not an error)
        assert h.link.stats["corrupt"] == 0 and h.link.stats["naks_in"] == 0


@pytest.mark.parametrize("kind", ["pty", "socket"])
def test_install_then_run_from_flash_matches_the_file(kind, model, data, tmp_path):
    with Rig(kind, flash=tmp_path / "flash.bin") as rig:
        gen, logits, result = install_then_run(rig, model)
        assert result["resumed_from"] == 0 and result["size"] == len(data)
        assert np.array_equal(logits, expected(data, TOKENS, gen))
    raw = (tmp_path / "flash.bin").read_bytes()
    assert raw[FLASH_DATA:FLASH_DATA + len(data)] == data


def test_fixture_model_live_over_pty():
    """A real tiny checkpoint (rwkv.cpp FP16), quantized on the fly by the host."""
    path = fixture_path("rwkv_cpp", "tiny-rwkv-5v2-730K-FP16.bin")
    with Rig("pty") as rig, HostSession(rig.url, timeouts=FAST) as h:
        h.hello()
        h.live(open_source(path, "Q5_1"))
        gen = h.eval(list(b"In a"), 1)
        got = h.logits()
    b = Board(open_source(path, "Q5_1"))
    for t in list(b"In a") + gen:
        want = b.eval(t)
    assert np.array_equal(got, want)


# -- faults (the mixes are conftest.LINK_FAULTS) ---------------------------------------------
@pytest.mark.parametrize("mode", ["live", "install"])
@pytest.mark.parametrize("fault", list(LINK_FAULTS))
def test_faulty_cable_gives_identical_logits(fault, mode, model, data, tmp_path):
    f = LINK_FAULTS[fault]
    seed = zlib.crc32(f"{fault}/{mode}".encode())
    kind = "socket" if fault in ("reordered frames", "delays") else "pty"
    with Rig(kind, to_board=Faults(**f), to_host=Faults(**f), seed=seed,
             flash=tmp_path / "flash.bin") as rig:
        if mode == "live":
            gen, logits, _ = live_logits(rig, model)
        else:
            gen, logits, _ = install_then_run(rig, model)
        tally(rig)
        assert rig.faults_injected() > 0
    assert np.array_equal(logits, expected(data, TOKENS, gen))


def test_disconnect_mid_install_resumes_from_the_last_verified_offset(model, data, tmp_path):
    flash = tmp_path / "flash.bin"
    cut = len(data) // 2                         # the relay hangs up after half the stream
    with Rig("socket", to_board=Faults(cut_after=cut), flash=flash) as rig:
        with pytest.raises(LinkError) as e:
            install_then_run(rig, model)
        assert "lost" in e.value.message or "no answer" in e.value.message
        tally(rig)
    with Rig("socket", flash=flash) as rig:
        gen, logits, result = install_then_run(rig, model)
        assert 0 < result["resumed_from"] <= cut
        assert result["sent"] <= len(data) - result["resumed_from"] + 4096
    assert np.array_equal(logits, expected(data, TOKENS, gen))


def test_silent_cable_mid_install_gives_a_clear_error_within_the_budget(model, tmp_path):
    with Rig("pty", to_board=Faults(cut_after=100_000, cut_for=60), flash=tmp_path / "f") as rig:
        t0 = time.monotonic()
        with pytest.raises(LinkError) as e:
            install_then_run(rig, model)
        elapsed = time.monotonic() - t0
        tally(rig)
    assert "no answer from the board" in e.value.message
    assert elapsed < FAST.budget() * 3 + 2


def test_short_outage_mid_pass_is_ridden_out(model, data):
    """The cable goes silent for less than the retry budget in the middle of a live pass."""
    with Rig("pty", to_board=Faults(cut_after=len(data) + len(data) // 2, cut_for=0.3)) as rig:
        gen, logits, h = live_logits(rig, model)
        tally(rig)
        assert rig.relay.counts["cuts"] == 1
    assert np.array_equal(logits, expected(data, TOKENS, gen))


def test_disconnect_mid_pass_then_a_new_session_continues(model, data):
    """The host hangs up in the middle of a live pass: the board undoes the pass; a new session
    sees how many tokens the board holds and continues from there."""
    cut = int(len(data) * 2.5)                   # inside the third pass
    with Rig("socket", to_board=Faults(cut_after=cut)) as rig:
        with pytest.raises(LinkError):
            live_logits(rig, model, tokens=TOKENS, n_gen=0)
        tally(rig)
        time.sleep(FAST.budget() + 0.2)            # the board gives up on its READs
        with HostSession(rig.url, timeouts=FAST) as h:
            info = h.hello()
            h.live(virtual_source(model))
            assert info.tokens == 0                # EVAL is all or nothing
            h.eval(TOKENS, 0)
            logits = h.logits()
        assert rig.board.stats["aborted_passes"] == 1
    assert np.array_equal(logits, expected(data, TOKENS, []))


def test_board_keeps_state_across_sessions(model, data):
    with Rig("pty") as rig:
        with HostSession(rig.url, timeouts=FAST) as h:
            h.hello()
            h.live(virtual_source(model))
            h.eval(TOKENS[:2])
        with HostSession(rig.url, timeouts=FAST) as h:
            assert h.hello().tokens == 2
            h.live(virtual_source(model))
            h.eval(TOKENS[2:])
            logits = h.logits()
            with pytest.raises(BoardError, match="POSITION"):
                h.eval([1], position=0)
    assert np.array_equal(logits, expected(data, TOKENS, []))


# -- refusals before sending ---------------------------------------------------------------
def test_board_lacking_a_type_is_refused_before_sending(model):
    with Rig("pty", types=("F32", "F16")) as rig, HostSession(rig.url, timeouts=FAST) as h:
        h.hello()
        with pytest.raises(BadInput, match=r"does not implement Q8_0.*--quant"):
            h.live(virtual_source(model))
        assert h.served == 0


def test_board_too_small_is_refused_before_sending(model):
    with Rig("pty", ram=20_000) as rig, HostSession(rig.url, timeouts=FAST) as h:
        h.hello()
        with pytest.raises(BadInput, match="lacks the RAM"):
            h.live(virtual_source(model))
        assert h.served == 0


def test_flash_too_small_is_refused(model, tmp_path):
    with Rig("pty", flash=str(tmp_path / "f")) as rig:
        rig.board.flash.capacity = 100_000
        with HostSession(rig.url, timeouts=FAST) as h:
            h.hello()
            with pytest.raises(BadInput, match="can store"):
                h.install(virtual_source(model))
            assert h.served == 0


def test_run_flash_without_install_says_so(tmp_path):
    with Rig("pty", flash=tmp_path / "f") as rig, HostSession(rig.url, timeouts=FAST) as h:
        h.hello()
        with pytest.raises(LinkError, match="no installed model"):
            h.run_flash()


def test_eval_before_a_model_is_a_board_error():
    with Rig("pty") as rig, HostSession(rig.url, timeouts=FAST) as h:
        h.hello()
        h.n_vocab = 256
        with pytest.raises(BoardError, match="NO_MODEL"):
            h.eval([1])


def test_set_baud_keeps_talking(model, data):
    with Rig("pty") as rig, HostSession(rig.url, timeouts=FAST) as h:
        h.hello()
        h.set_baud(460800)
        h.live(virtual_source(model))
        h.eval(TOKENS)
        assert np.array_equal(h.logits(), expected(data, TOKENS, []))
