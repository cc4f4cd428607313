"""User-registered quant types (`--plugin FILE`, docs/plugins.md), end to end through the CLI.

The example plug-in docs/examples/plugin_q3s.py (3-bit, 14-byte blocks) converts a tiny model to
a stream that validate, inspect, plan and run read with --plugin; without it every reader refuses
the stream with one line naming Q3S. Broken plug-in files are refused with one line, exit 2.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, fp32_model, run_cli
from reference_forward import ReferenceRWKV

PLUGIN = REPO / "docs" / "examples" / "plugin_q3s.py"
MODEL = "4v0-660K"
TOKENS = [10, 72, 101, 108, 108, 111, 32, 119]


def _one_line_error(proc, *needles) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def q3s_stream(tmp_path_factory):
    out = tmp_path_factory.mktemp("plugin") / "q3s.rwks"
    proc = run_cli("convert", fp32_model(MODEL), "-o", out, "--quant", "Q3S", "--plugin", PLUGIN,
                   "--json", check_status=0)
    assert json.loads(proc.stdout)["quant"] == "Q3S"
    return out


@pytest.fixture
def plugin_loaded(monkeypatch):
    """Q3S registered in this process for the test only (the type table is restored after)."""
    from formats import plugins, quants
    monkeypatch.setattr(quants, "TYPES", list(quants.TYPES))
    monkeypatch.setattr(plugins, "_loaded", {})
    (qtype,) = plugins.load_plugin(PLUGIN)
    return qtype


# -- the example type itself --------------------------------------------------------------------
def test_example_type_layout_and_dot(plugin_loaded):
    q = plugin_loaded
    assert (q.name, q.id, q.block_size, q.block_bytes, q.plugin) == ("Q3S", 200, 32, 14,
                                                                     str(PLUGIN))
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    data = q.quantize(w)
    assert data.shape == (6, 2 * 14)
    back = q.dequantize(data, w.shape)
    # 8 levels -4d..3d with d = m / -4 (m the block's signed extreme): m is exact, the rest
    # within one step of it or half a step of a level.
    blocks = w.reshape(-1, 32)
    m = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(1)]
    d = np.abs(m) / 4
    err = np.abs(back.reshape(-1, 32) - blocks)
    assert np.all(err <= d[:, None] * 1.01 + 1e-6)
    assert np.allclose(back.reshape(-1, 32)[np.arange(len(blocks)), np.abs(blocks).argmax(1)],
                       m, rtol=1e-3)
    # The board path: matvec over runs that cut rows anywhere == dequantized W @ x.
    x = rng.standard_normal(64).astype(np.float32)
    xf = np.zeros(64, np.float32)
    z = np.zeros(64, np.float32)
    for int8_mode in (False, True):
        q.prepare_activation(int8_mode, x, xf, z, z, z)
        out = np.zeros(6, np.float32)
        raw = data.reshape(-1)
        first = 0
        for nb in (1, 4, 2, 5):
            q.matvec_blocks(int8_mode, raw[first * 14:(first + nb) * 14], nb, first, 2,
                            xf, z, z, z, out)
            first += nb
        want = back.astype(np.float64) @ x
        tol = 1e-5 if not int8_mode else 1e-2 * np.abs(back).sum(1) * np.abs(x).max()
        assert np.all(np.abs(out - want) <= tol), (int8_mode, out, want)
    deq = np.zeros(6 * 64, np.float32)
    q.dequantize_into(data.reshape(-1), deq)
    assert np.array_equal(deq, back.reshape(-1))


# -- a stream of a plug-in type, end to end -------------------------------------------------------
def test_validate_and_inspect_with_plugin(q3s_stream):
    proc = run_cli("validate", q3s_stream, "--deep", "--plugin", PLUGIN, check_status=0)
    assert b"every value finite" in proc.stdout
    info = json.loads(run_cli("inspect", q3s_stream, "--json", "--plugin", PLUGIN,
                              check_status=0).stdout)
    assert "Q3S" in json.dumps(info)
    # The flag also goes before the command.
    text = run_cli("--plugin", PLUGIN, "inspect", q3s_stream, check_status=0).stdout.decode()
    assert "Q3S" in text and "3.5" in text
    run_cli("plan", q3s_stream, "--board", "rp2350", "--plugin", PLUGIN, check_status=0)


def _stream_tensors(path) -> dict:
    from host.stream.reader import StreamFile
    f = StreamFile(path)
    out = {}
    for rec in f.walk():
        if rec.qtype is not None and rec.name in f.shapes:
            data = np.frombuffer(f.buf, np.uint8, rec.data_size, rec.data_offset)
            out[rec.name] = rec.qtype.dequantize(data, rec.shape)
    return out, f.hparams.version.label


def test_run_matches_reference_on_dequantized_weights(q3s_stream, plugin_loaded, tmp_path):
    tensors, version = _stream_tensors(q3s_stream)
    assert sum(1 for t in tensors.values() if t.ndim == 2) > 0
    want, _ = ReferenceRWKV(tensors, version).run(TOKENS)
    logits = tmp_path / "logits.npy"
    run_cli("run", q3s_stream, "--prompt-tokens", ",".join(map(str, TOKENS)), "--logits-out",
            logits, "--plugin", PLUGIN, "--chunk", "1000", check_status=0)
    got = np.load(logits)
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= 1e-4 * np.maximum(1, np.abs(want))), \
        np.abs(got - want).max()
    # int8 mode: the plug-in's dot_int8 (int8 activations): close, not equal.
    run_cli("run", q3s_stream, "--prompt-tokens", ",".join(map(str, TOKENS)), "--logits-out",
            logits, "--plugin", PLUGIN, "--mode", "int8", check_status=0)
    got8 = np.load(logits)
    assert np.abs(got8 - want).max() <= 0.05 * np.abs(want).max()
    assert np.array_equal(got8.argmax(1), want.argmax(1)) or \
        np.corrcoef(got8.reshape(-1), want.reshape(-1))[0, 1] > 0.999


def test_run_checkpoint_on_the_fly_equals_the_stream(q3s_stream, tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    toks = ",".join(map(str, TOKENS[:4]))
    run_cli("run", fp32_model(MODEL), "--quant", "Q3S", "--plugin", PLUGIN, "--prompt-tokens",
            toks, "--logits-out", a, check_status=0)
    run_cli("run", q3s_stream, "--plugin", PLUGIN, "--prompt-tokens", toks, "--logits-out", b,
            check_status=0)
    assert np.array_equal(np.load(a), np.load(b))


@pytest.mark.parametrize("argv", [
    ("validate", "{s}"), ("validate", "{s}", "--json"), ("inspect", "{s}"),
    ("run", "{s}", "--prompt", "Hi", "-n", "2"), ("plan", "{s}", "--board", "rp2350"),
    ("install", "{s}", "--port", "rwkvsim://sim"),
], ids=["validate", "validate-json", "inspect", "run", "plan", "install"])
def test_without_plugin_every_reader_refuses(q3s_stream, argv):
    proc = run_cli(*(a.format(s=q3s_stream) for a in argv))
    line = _one_line_error(proc, "Q3S", "id 200", "--plugin")
    assert "not loaded" in line


def test_plugin_type_not_loaded_refused_by_the_board(q3s_stream):
    """The simulated board itself (read_stream_info), without the CLI."""
    from firmware_sim.board import Board
    from firmware_sim.sources import FileSource
    from formats.errors import BadInput
    with pytest.raises(BadInput, match=r"Q3S \(id 200\).*--plugin"):
        Board(FileSource(str(q3s_stream)))


def test_install_and_serve_with_plugin(q3s_stream, tmp_path):
    flash = tmp_path / "flash.bin"
    run_cli("install", q3s_stream, "--port", f"rwkvsim://sim?flash={flash}", "--plugin", PLUGIN,
            check_status=0)
    proc = run_cli("serve", q3s_stream, "--port", "rwkvsim://sim", "--plugin", PLUGIN,
                   "--prompt-tokens", "1,2,3", "-n", "3", check_status=0)
    assert proc.stdout


# -- broken plug-ins ------------------------------------------------------------------------------
_GOOD = PLUGIN.read_text()

BROKEN = {
    "syntax": ("def broken(:\n    pass\n", ["syntax error at line 1"]),
    "raises": ("import numpy\nraise RuntimeError('no GPU here')\n",
               ["RuntimeError at line 2", "no GPU here"]),
    "exits": ("import sys\nsys.exit(3)\n", ["SystemExit"]),
    "id_out_of_range": (_GOOD.replace('"Q3S", 200', '"Q3S", 12'),
                        ["id 12 is outside the plug-in ids 192..254"]),
    "name_clash_builtin": (_GOOD.replace('"Q3S", 200', '"Q4_0", 200'),
                           ["Q4_0", "clashes with Q4_0 (id 2)"]),
    "bad_name": (_GOOD.replace('"Q3S", 200', '"q3:s", 200'), ["'q3:s'"]),
    "dot_disagrees": (_GOOD.replace("return d * ((q.astype(np.float32) - 4) * x).sum(axis=1)",
                                    "return d * ((q.astype(np.float32) - 3) * x).sum(axis=1)"),
                      ["Q3S", "dot disagrees with dequantize"]),
    "wrong_block_bytes": (_GOOD.replace("BLOCK_BYTES = 2 + 12", "BLOCK_BYTES = 2 + 13"),
                          ["Q3S", "quantize"]),
    "registers_nothing": ("X = 1\n", ["registers no type"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_plugin_is_refused(tmp_path, case):
    source, needles = BROKEN[case]
    assert source != _GOOD, "the replacement did not apply"
    bad = tmp_path / f"bad_{case}.py"
    bad.write_text(source)
    out = tmp_path / "out.rwks"
    proc = run_cli("convert", fp32_model(MODEL), "-o", out, "--quant", "Q3S", "--plugin", bad)
    _one_line_error(proc, str(bad), *needles)
    assert not out.exists()
    # Every command loads plug-ins first: inspect refuses the same file the same way.
    _one_line_error(run_cli("inspect", fp32_model(MODEL), "--plugin", bad), str(bad), *needles)


def test_missing_plugin_file(tmp_path):
    _one_line_error(run_cli("inspect", fp32_model(MODEL), "--plugin", tmp_path / "nope.py"),
                    "nope.py", "no such plug-in file")


def test_two_plugins_with_one_name_clash(tmp_path):
    twin = tmp_path / "twin.py"
    twin.write_text(_GOOD.replace('"Q3S", 200', '"Q3S", 201'))
    line = _one_line_error(run_cli("inspect", fp32_model(MODEL), "--plugin", PLUGIN, "--plugin",
                                   twin), str(twin), "clashes with Q3S (id 200)")
    assert str(PLUGIN) in line


def test_same_plugin_twice_loads_once(q3s_stream):
    run_cli("inspect", q3s_stream, "--plugin", PLUGIN, "--plugin", PLUGIN, check_status=0)


def test_register_type_checks_in_process(plugin_loaded):
    from formats.errors import BadInput
    from formats.plugins import register_type
    ok = dict(block_size=4, block_bytes=4,
              quantize=lambda x: np.clip(np.rint(x * 10), -127, 127).astype(np.int8).view(np.uint8),
              dequantize=lambda b: b.view(np.int8).astype(np.float32) / 10,
              dot=lambda b, x: (b.view(np.int8).astype(np.float32) / 10 * x).sum(1))
    with pytest.raises(BadInput, match="clashes with Q3S"):
        register_type("Q3S", 210, **ok)
    with pytest.raises(BadInput, match="clashes with Q3S"):
        register_type("I8X", 200, **ok)
    with pytest.raises(BadInput, match="block_size 0"):
        register_type("I8X", 210, **{**ok, "block_size": 0})
    with pytest.raises(BadInput, match="dot raised ZeroDivisionError"):
        register_type("I8X", 210, **{**ok, "dot": lambda b, x: 1 / 0})
    with pytest.raises(BadInput, match="dequantize.*not finite"), np.errstate(all="ignore"):
        register_type("I8X", 210, **{**ok, "dequantize":
                                     lambda b: b.view(np.int8).astype(np.float32) / 0})
    q = register_type("I8X", 210, **ok)
    assert q.plugin and q.bits_per_weight == 8.0
