"""The in-process simulated board behind `rwkvsim://`, through pyserial's URL handlers."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import run_cli
from host.link.framing import LinkError
from host.link.host import HostSession
from test_link_rig import reference_logits, stream_bytes, synth_model, virtual_source


def test_live_and_install_over_rwkvsim_match_the_file(tmp_path):
    model = synth_model()
    data = stream_bytes(model)
    with HostSession("rwkvsim://sim") as h:
        h.hello()
        h.live(virtual_source(model))
        gen = h.eval([5, 6, 7], 2)
        assert np.array_equal(h.logits(), reference_logits(data, [5, 6, 7] + list(gen)))
    flash = tmp_path / "flash.bin"
    with HostSession(f"rwkvsim://sim?flash={flash}") as h:
        h.hello()
        result = h.install(virtual_source(model))
        assert result["size"] == len(data)
        h.hello()
        h.run_flash()
        h.reset()
        gen = h.eval([9, 10], 1)
        assert np.array_equal(h.logits(), reference_logits(data, [9, 10] + list(gen)))


def test_rwkvsim_bad_board_is_one_clear_error():
    with pytest.raises(LinkError, match="cannot start the board"):
        HostSession("rwkvsim://z80")


def test_cli_install_to_rwkvsim(tmp_path):
    from conftest import fp32_model
    src = fp32_model("7v0-834K")
    proc = run_cli("install", src, "--port", f"rwkvsim://esp32s3?flash={tmp_path / 'f.bin'}",
                   "--quant", "Q4_0", "--json", check_status=0)
    assert b"crc" in proc.stdout.lower()
