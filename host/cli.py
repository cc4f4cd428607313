"""The one command line, `rwkv-stream`. Errors of the project's hierarchy are caught here, once."""
from __future__ import annotations

import argparse
import json
import sys

from formats.errors import RwkvStreamError, UsageError

from . import __version__


def _add_json(p):
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def _add_plugin(p, dest="plugin"):
    p.add_argument("--plugin", action="append", default=[], metavar="FILE", dest=dest,
                   help="load this Python file first: the quant types it registers become "
                        "usable (repeatable; docs/plugins.md)")


def _load_plugins(args) -> None:
    paths = getattr(args, "plugin_first", []) + getattr(args, "plugin", [])
    if paths:
        from formats.plugins import load_plugin
        for path in paths:
            load_plugin(path)


def _add_quant(p, required=False, default=None):
    p.add_argument("--quant", required=required, default=default, metavar="TYPE",
                   help="target type for the tensors rwkv.cpp quantizes: F32, F16, BF16, Q8_0, "
                        "Q5_1, Q5_0, Q4_1, Q4_0, Q6_K..Q2_K, QX[:options] (e.g. QX:bpw=4.5), "
                        "auto:BPW (per-tensor types for a size budget), or a type a --plugin "
                        "registers")
    p.add_argument("--tensor-type", action="append", default=[], metavar="GLOB=TYPE",
                   help="override the type of tensors whose canonical name matches GLOB "
                        "(repeatable; the last match wins), e.g. 'head.weight=Q8_0'")
    p.add_argument("--imatrix", metavar="FILE.npz",
                   help="importance statistics from `calibrate`: Q4_0/Q4_1/Q5_0/Q5_1 and QX "
                        "minimise importance-weighted error; auto:BPW uses them too")
    p.add_argument("--calib-text", metavar="FILE",
                   help="--quant auto:BPW: measure each tensor's sensitivity as the KL over "
                        "this text (else a weighted-error proxy)")


def cmd_inspect(args):
    from .inspect_cmd import describe, format_text
    info = describe(args.file)
    print(json.dumps(info, indent=1) if args.json else format_text(info))


def cmd_convert(args):
    from .convert import convert
    result = convert(args.src, args.output, args.quant, args.tensor_type, args.format,
                     args.imatrix, args.calib_text)
    if args.json:
        print(json.dumps(result, indent=1))
    elif args.output != "-":
        print(f"wrote {args.output} ({result['format']}, {result['quant']})", file=sys.stderr)
    if not args.json:
        for note in result.get("fallback_notes", ()):
            print(f"  {note}", file=sys.stderr)


def cmd_validate(args):
    from formats.errors import CheckFailed

    from .stream.reader import validate
    try:
        result = validate(args.file, deep=args.deep)
    except CheckFailed as e:
        if not args.json:
            raise
        print(json.dumps(dict(ok=False, file=args.file, error=e.message, record=e.tensor,
                              offset=e.offset), indent=1))
        return 1
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"OK: {args.file}: stream {result['major']}.{result['minor']}, RWKV "
              f"v{result['version']}, {result['tensors']} tensors, {result['bytes']:,} bytes"
              + (", every value finite" if args.deep else ""))
    return 0


def cmd_run(args):
    from .run_cmd import run
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    elif "texts" in result:
        for n, text in enumerate(result["texts"]):
            print(f"[{n}] {text}")
        print(f"[batch of {result['batch']}: {result['passes']} passes, "
              f"{result['bytes_read_per_pass']:,} bytes read per pass, "
              f"{result['bytes_read_per_token']:,} per token; {result['tokens_per_second']} "
              f"tokens/s simulated compute]", file=sys.stderr)
    else:
        r = result
        lines = [f"[{r['prompt_tokens']} prompt tokens in {r['prompt_passes']} passes "
                 f"({r['sequence_columns']} per pass), {len(r['generated'])} generated; "
                 f"{r['tokens_per_second']} tokens/s simulated compute]",
                 f"[bytes read: {r['bytes_read_per_prompt_token']:,} per prompt token"
                 + (f", {r['bytes_read_per_generated_token']:,} per generated token"
                    if r['bytes_read_per_generated_token'] else "") + "]",
                 f"[RAM: {r['ram_used']['sram']:,} bytes internal, {r['ram_used']['psram']:,} "
                 f"external]"]
        if "transfer_seconds" in r:
            lines.append(f"[{r['board']}: moving those bytes takes " + ", ".join(
                f"{k} {v} s" for k, v in r["transfer_seconds"].items()) + "]")
        print("\n".join(lines), file=sys.stderr)


def cmd_eval(args):
    from .quality import evaluate
    r = evaluate(args.model, args.text, quant=args.quant, overrides=args.tensor_type,
                 importance=args.imatrix, calib_text=args.calib_text,
                 mode=args.mode, reference=args.reference, columns=args.seq,
                 tokenizer=args.tokenizer, limit=args.limit)
    if args.json:
        print(json.dumps(r, indent=1))
        return
    print(f"{r['model']} ({r['quant'] or 'as stored'}, {r['mode']} mode) on {r['text']}: "
          f"{r['tokens']:,} predictions, {r['bytes']:,} bytes")
    print(f"  bits per byte   {r['bits_per_byte']:.4f}   (bits per token "
          f"{r['bits_per_token']:.4f})")
    if r["reference"]:
        print(f"  F32 reference   {r['reference_bits_per_byte']:.4f} bits per byte")
        print(f"  KL(F32 || model) mean {r['kl_mean']:.6f} nats, max {r['kl_max']:.4f}")
        print(f"  top-1 agreement {100 * r['top1_agreement']:.2f}%")


def cmd_calibrate(args):
    from .quality import calibrate
    r = calibrate(args.model, args.text, args.output, quant=args.quant, columns=args.seq,
                  tokenizer=args.tokenizer, limit=args.limit)
    print(json.dumps(r, indent=1) if args.json else
          f"{r['output']}: importance of {r['tensors']} matrices over {r['tokens']:,} tokens")


def cmd_sweep(args):
    from .sweep import SETTINGS, format_table, plot, sweep
    settings = [x for x in args.settings.split(",") if x] if args.settings else SETTINGS
    # "QX:bpw=3,bs=64" would split: rejoin option fragments with the setting before them
    joined = []
    for x in settings:
        if joined and "=" in x and ":" not in x:
            joined[-1] += "," + x
        else:
            joined.append(x)
    if args.plot:
        from .sweep import need_matplotlib
        need_matplotlib()               # before minutes of work, not after
    result = sweep(args.model, args.text, joined, tokenizer=args.tokenizer, limit=args.limit,
                   columns=args.seq, importance=args.imatrix, calib_text=args.calib_text,
                   progress=lambda s: print(f"  {s}", file=sys.stderr) if not args.json else None)
    if args.plot:
        plot(result, args.plot)
        result["plot"] = args.plot
    print(json.dumps(result, indent=1) if args.json else format_table(result))


def cmd_plan(args):
    from firmware_sim.profiles import get_profile

    from .plan_cmd import format_text, plan
    board = get_profile(args.board).with_overrides(args.ram, args.psram, args.flash)
    result = plan(args.model, board, args.quant, args.tensor_type, args.chunk,
                  importance=args.imatrix, calib_text=args.calib_text)
    print(json.dumps(result, indent=1) if args.json else format_text(result))
    return 0 if result["fits"] else 1


def cmd_demo(args):
    from .demo import main_demo
    result = main_demo(args)
    if args.json:
        print(json.dumps(result, indent=1))


def cmd_synth(args):
    from formats.arch import RwkvVersion
    from formats.quants import by_name

    from .bin_writer import write_bin
    from .model import Model
    from .outputs import atomic_output
    from .plan import make_plan
    from .synth import SyntheticCheckpoint, synth_hparams
    hp = synth_hparams(RwkvVersion.parse(args.arch), args.n_embd, args.n_layer, args.n_vocab,
                       ffn_size=args.ffn_size, head_size=args.head_size)
    model = Model(SyntheticCheckpoint(hp, seed=args.seed))
    target = by_name(args.dtype)
    with atomic_output(args.output) as out:
        write_bin(model, make_plan(model, target), target, out)
    if args.json:
        print(json.dumps(dict(output=args.output, **hp.as_dict()), indent=1))


def cmd_bench(args):
    import os
    # Benchmarks compare one thread with one thread: keep BLAS (numpy's dense reference) to
    # one too. numpy is not imported yet at this point, so this takes effect.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    if args.what == "quantize":
        from .bench_quantize import format_table, run
        rows = run(size=args.size, repeat=args.repeat)
    elif args.what == "convert":
        from .bench_convert import format_table, run
        rows = run()
    elif args.what == "sequence":
        from .bench_sequence import format_table, run
        rows = run()
    elif args.what == "link":
        from .bench_link import format_table, run
        rows = run()
    elif args.what == "types":
        from .bench_types import format_table, run
        rows = run(repeat=args.repeat)
    else:
        from .bench_run import format_table, run
        rows = run(repeat=args.repeat, **({"quants": (args.quant,)} if args.quant else {}))
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rwkv-stream",
        description="Quantize RWKV checkpoints on the fly into a stream that microcontrollers "
                    "run. See docs/cli.md for the shared flags and exit statuses.")
    p.add_argument("--version", action="version", version=f"rwkv-stream {__version__}")
    _add_plugin(p, dest="plugin_first")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("demo", help="the whole pipeline with the bundled model, no board needed",
                       description="Quantize the bundled tiny model on the fly, install it over "
                                   "a real pty into a simulated board, generate text from the "
                                   "board's flash, and print what it cost.")
    s.add_argument("--board", default="rp2350", help="board profile (default rp2350)")
    s.add_argument("--quant", default="Q5_1", help="type for the matrices (default Q5_1)")
    s.add_argument("--prompt", default="The ", help="prompt text")
    s.add_argument("-n", type=int, default=120, help="bytes to generate (default 120)")
    s.add_argument("--temperature", type=float, default=0.0,
                   help="sample on the host from the logits the board sends back (default 0: "
                        "the board generates greedily)")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: off)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    s.add_argument("--seed", type=int, help="random seed for sampling")
    s.add_argument("--model", help=argparse.SUPPRESS)
    _add_json(s)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("inspect", help="version, dimensions and every tensor of a model file",
                       description="Show a model file's RWKV version, dimensions and every "
                                   "tensor with its type, shape, bytes and bits per weight. "
                                   "Reads rwkv.cpp .bin, PyTorch .pth and safetensors.")
    s.add_argument("file")
    _add_json(s)
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("convert", help="convert/quantize a checkpoint into another file",
                       description="Read any checkpoint and write it quantized. The output "
                                   "format follows the suffix of -o (.bin = rwkv.cpp) or "
                                   "--format. A .bin keeps the source's tensor order and is "
                                   "byte-identical to what rwkv.cpp's quantizer writes.")
    s.add_argument("src")
    s.add_argument("-o", "--output", required=True, help="output file ('-' for stdout)")
    _add_quant(s, required=True)
    s.add_argument("--format", choices=["rwkv.cpp", "stream"],
                   help="output format, overriding the suffix (.bin = rwkv.cpp, .rwks = stream)")
    _add_json(s)
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("plan", help="does a model fit a board, and how fast will it run",
                       description="Before anything is sent: whether the state and buffers fit "
                                   "the board's RAM (the RAM map), whether the stream fits its "
                                   "flash/PSRAM (install) or must be streamed live, bytes read "
                                   "per token, and tokens/s at each of the board's link speeds "
                                   "and from flash/PSRAM. Exit 1 when it does not fit.")
    s.add_argument("model", metavar="MODEL", help="a stream (.rwks) or any checkpoint")
    s.add_argument("--board", required=True,
                   help="rp2040, rp2350, esp32s3, stm32h7, nrf52840, or a .toml/.json profile")
    _add_quant(s)
    s.add_argument("--ram", type=int, help="override the board's SRAM bytes")
    s.add_argument("--psram", type=int, help="override the board's PSRAM bytes")
    s.add_argument("--flash", type=int, help="override the board's flash bytes")
    s.add_argument("--chunk", type=int, default=4096, help="chunk buffer bytes (default 4096)")
    _add_json(s)
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("validate", help="check a stream file; explain the first problem",
                       description="Check a stream's magic, versions, CRCs, record order "
                                   "against the architecture, shapes against the header, types "
                                   "against the table, sizes and the trailer index. Prints the "
                                   "first error with its byte offset and record; exit 1 when the "
                                   "stream is bad.")
    s.add_argument("file")
    s.add_argument("--deep", action="store_true",
                   help="also dequantize every tensor and check each value is finite")
    _add_json(s)
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("run", help="run a model on a simulated board",
                       description="Run a model on a simulated board with a fixed RAM budget, "
                                   "reading the stream front to back through a chunk buffer. "
                                   "MODEL is a stream (.rwks) or any checkpoint, quantized on the "
                                   "fly with --quant. The prompt is fed one token at a time; then "
                                   "N tokens are generated (greedy unless --temperature) and "
                                   "printed as they come.")
    s.add_argument("model", metavar="MODEL")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="file whose bytes are the prompt")
    g.add_argument("--prompt-tokens", help="comma-separated token ids")
    g.add_argument("--batch-file", metavar="FILE",
                   help="one prompt per line: all of them advance together, one pass over the "
                        "weights per step (batch mode); texts printed at the end")
    s.add_argument("-n", type=int, default=0, help="tokens to generate")
    s.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (default 0: greedy)")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: off)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    s.add_argument("--seed", type=int, help="random seed for sampling")
    s.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when the generated text contains TEXT (repeatable)")
    s.add_argument("--tokenizer", help="bytes, world, or a tokenizer.json path (default: by "
                                       "vocabulary size: 256 bytes, 65536 world)")
    s.add_argument("--mode", choices=["float", "int8"], default="float",
                   help="float: activations stay float32; int8: Q8 activations and integer "
                        "dot products, as an MCU (and rwkv.cpp) computes")
    _add_quant(s)
    s.add_argument("--ram", type=int, help="the board's RAM budget in bytes (default: exactly "
                                           "what the model needs)")
    s.add_argument("--psram", type=int, help="external RAM bytes (state and logits may live "
                                             "there)")
    s.add_argument("--seq", type=int, help="prompt tokens per pass over the weights (sequence "
                                           "mode; default: as many as --ram allows, up to 64)")
    s.add_argument("--board", help="a board profile: adds the time its links/flash would need "
                                   "to move the bytes read to the cost report")
    s.add_argument("--chunk", type=int, default=4096, help="chunk buffer bytes (default 4096)")
    s.add_argument("--xip", action="store_true",
                   help="the stream file is memory-mapped like XIP flash: read weights in place "
                        "instead of copying them through the chunk buffer")
    s.add_argument("--no-crc", action="store_true",
                   help="do not check payload CRCs (by default the board checks each record's "
                        "CRC the first time it reads it)")
    s.add_argument("--logits-out", metavar="FILE.npy",
                   help="save the logits after every prompt token (T x n_vocab float32)")
    s.add_argument("--state-in", metavar="F", help="start from this state (flat float32)")
    s.add_argument("--state-out", metavar="F", help="save the final state (flat float32)")
    _add_json(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("synth", help="write a random, well-scaled checkpoint of any shape",
                       description="Write a random RWKV checkpoint (rwkv.cpp .bin) of any "
                                   "shape, e.g. RWKV-4 169M: --arch v4 --n-embd 768 "
                                   "--n-layer 12 --n-vocab 50277.")
    s.add_argument("--arch", required=True, help="v4, v5.1, v5.2, v6 or v7")
    s.add_argument("--n-embd", type=int, required=True)
    s.add_argument("--n-layer", type=int, required=True)
    s.add_argument("--n-vocab", type=int, required=True)
    s.add_argument("--ffn-size", type=int, help="default 4 x n_embd (3.5 x for v6)")
    s.add_argument("--head-size", type=int, help="default 64 (or n_embd if smaller)")
    s.add_argument("--dtype", default="F32", choices=["F32", "F16"],
                   help="F16 stores matrices as rwkv.cpp's FP16 converter does")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True)
    _add_json(s)
    s.set_defaults(func=cmd_synth)

    try:
        from .link.cli import add_link_commands    # the serial link (install, serve, chat, board-sim)
    except ImportError:
        pass
    else:
        add_link_commands(sub, _add_json, _add_quant)

    s = sub.add_parser("eval", help="quality of a quantized model on a text: bits per byte, "
                                    "KL and top-1 agreement against F32",
                       description="Run MODEL (a stream, or a checkpoint quantized on the fly "
                                   "with --quant) on the simulated board over a text, K tokens "
                                   "a pass, and compare every next-token distribution with the "
                                   "same checkpoint in F32 (float mode): mean KL divergence "
                                   "(nats), top-1 agreement, and the model's bits per byte. For "
                                   "a stream MODEL, give the checkpoint with --reference (else "
                                   "only bits per byte).")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to evaluate on")
    s.add_argument("--reference", metavar="CKPT",
                   help="the F32 reference checkpoint (default: MODEL when it is a checkpoint)")
    s.add_argument("--mode", choices=["float", "int8"], default="float",
                   help="the model's arithmetic (the reference is always float)")
    s.add_argument("--seq", type=int, default=32, help="tokens per pass (default 32)")
    s.add_argument("--limit", type=int, help="evaluate only the first N tokens")
    s.add_argument("--tokenizer", help="bytes, world, or a tokenizer.json path")
    _add_quant(s)
    _add_json(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("calibrate", help="per-column importance of every matrix's input, "
                                         "measured on a text (for --imatrix)",
                       description="Run MODEL on the simulated board (float mode) over a text "
                                   "and save, for every matrix, the mean squared activation of "
                                   "each input column (llama.cpp's importance matrix) to an "
                                   ".npz file.")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--text", required=True, metavar="FILE")
    s.add_argument("-o", "--output", required=True, metavar="FILE.npz")
    s.add_argument("--seq", type=int, default=32, help="tokens per pass (default 32)")
    s.add_argument("--limit", type=int, help="use only the first N tokens")
    s.add_argument("--tokenizer", help="bytes, world, or a tokenizer.json path")
    s.add_argument("--quant", metavar="TYPE", help="run the model quantized (default: as stored)")
    _add_json(s)
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("sweep", help="quality against size: every type, QX settings and auto "
                                     "budgets on a text; a table and a plot",
                       description="Evaluate MODEL (a checkpoint) quantized every way on a text "
                                   "against its F32 self: bits per weight of the quantized "
                                   "matrices, stream bytes, bits per byte, mean KL, top-1 "
                                   "agreement. --plot FILE.png draws KL against size "
                                   "(needs matplotlib).")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--text", required=True, metavar="FILE")
    s.add_argument("--settings", metavar="LIST",
                   help="comma-separated --quant values (default: all types, QX bpw 3..6, "
                        "auto 3.5..6); e.g. Q4_0,QX:bpw=4.5,auto:4.5")
    s.add_argument("--plot", metavar="FILE.png")
    s.add_argument("--seq", type=int, default=32, help="tokens per pass (default 32)")
    s.add_argument("--limit", type=int, help="use only the first N tokens")
    s.add_argument("--tokenizer", help="bytes, world, or a tokenizer.json path")
    s.add_argument("--imatrix", metavar="FILE.npz", help="importance from calibrate")
    s.add_argument("--calib-text", metavar="FILE",
                   help="auto settings: KL-scaled sensitivity over this text")
    _add_json(s)
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("bench", help="benchmarks (ratios measured side by side in one run)")
    s.add_argument("what", choices=["quantize", "convert", "run", "sequence", "link", "types"],
                   help="quantize: kernels vs gguf-py; convert: checkpoint -> stream vs the bare "
                        "quantizer, and peak memory; run: simulated-board tokens/s vs a dense "
                        "numpy forward; sequence: serial vs sequence vs batch passes; link: "
                        "serial-link efficiency and throughput through a pacing relay; types: "
                        "k-quants and QX next to Q4_0 (kernels and simulator)")
    s.add_argument("--size", type=int, default=4096, help="matrix is SIZE x SIZE")
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--quant", metavar="TYPE", help="bench run: only this type (default F16, "
                                                   "Q8_0, Q5_1, Q4_0)")
    _add_json(s)
    s.set_defaults(func=cmd_bench)
    for s in set(sub.choices.values()):     # every command, the link's included
        _add_plugin(s)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _load_plugins(args)
        status = args.func(args)
    except RwkvStreamError as e:
        print(f"rwkv-stream: error: {e.line()}", file=sys.stderr)
        return e.exit_status
    except BrokenPipeError:     # the reader of our stdout went away (e.g. `| head`)
        return 1
    except OSError as e:        # a file the user named cannot be read or written
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"rwkv-stream: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rwkv-stream: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
