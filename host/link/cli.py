"""`rwkv-stream install | serve | chat | board-sim`: the serial link's commands."""
from __future__ import annotations

import json
import sys

from formats.errors import UsageError

from . import protocol as P


def _add_port(p, board_help):
    p.add_argument("--port", required=True, metavar="URL",
                   help="serial port: /dev/ttyACM0, a pty path, or socket://HOST:PORT")
    p.add_argument("--baud", type=int, metavar="B",
                   help=f"line rate; timeouts scale with it (default {P.NOMINAL_BAUD})")
    p.add_argument("--board", metavar="NAME", help=board_help)


def _add_host_flags(p):
    p.add_argument("--set-baud", type=int, metavar="B",
                   help="after the handshake, switch host and board to this baud rate")
    p.add_argument("--trace", action="store_true", help="hex dump of every byte on stderr")


def _add_prompt(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="one prompt (otherwise: one prompt per line of stdin)")
    g.add_argument("--prompt-tokens", help="comma-separated token ids")
    p.add_argument("-n", type=int, default=32, help="tokens to generate per prompt (greedy)")
    p.add_argument("--tokenizer", help="bytes, world or PATH/tokenizer.json (default: by "
                                       "vocabulary size)")


def add_link_commands(sub, add_json, add_quant):
    board_help = ("expected board profile (firmware_sim/profiles.py): the stream is checked "
                  "against it before the port is opened")
    s = sub.add_parser("install", help="store a stream in a board's flash over the serial link",
                       description="Send a stream (SRC: a stream file, or any checkpoint "
                                   "quantized on the fly with --quant) into the board's flash. "
                                   "The board pulls byte ranges; an interrupted install resumes "
                                   "from the last verified offset; the board reports a CRC-32 "
                                   "of the whole stream at the end.")
    s.add_argument("src", metavar="SRC")
    _add_port(s, board_help)
    add_quant(s)
    _add_host_flags(s)
    add_json(s)
    s.set_defaults(func=cmd_install)

    s = sub.add_parser("serve", help="serve a model live to a board that pulls it every pass",
                       description="Run a model on a board that cannot store it: the board "
                                   "pulls the stream's byte ranges over the link for every "
                                   "pass (SRC quantized on the fly). Then prompts: tokens in, "
                                   "tokens out.")
    s.add_argument("src", metavar="SRC")
    _add_port(s, board_help)
    add_quant(s)
    _add_prompt(s)
    _add_host_flags(s)
    add_json(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("chat", help="prompts to a board that has an installed model",
                       description="Prompts to a board running its installed model: the host "
                                   "tokenizes, the board generates, the host detokenizes.")
    _add_port(s, board_help)
    _add_prompt(s)
    _add_host_flags(s)
    add_json(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("board-sim", help="a simulated board at the end of a serial port",
                       description="The simulator as a board: answers the handshake, installs "
                                   "into a flash file or runs live, then evaluates tokens. "
                                   "socket://HOST:PORT listens there (one host at a time).")
    s.add_argument("--port", required=True, metavar="URL")
    s.add_argument("--baud", type=int, metavar="B")
    s.add_argument("--board", default="sim", metavar="NAME",
                   help="board profile (default sim: 64 MiB RAM, every type)")
    s.add_argument("--flash", metavar="FILE", help="simulated flash file (install needs one)")
    s.add_argument("--no-live", action="store_true", help="refuse live mode (flash only)")
    s.add_argument("--ram", type=int, help="override the profile's RAM bytes")
    s.add_argument("--psram", type=int)
    s.add_argument("--flash-size", type=int, help="override the profile's flash bytes")
    s.add_argument("--types", help="comma-separated types the board implements")
    s.add_argument("--chunk", type=int, help="chunk buffer bytes (default 4096)")
    s.add_argument("--max-frame", type=int, help="largest frame payload (default 4096)")
    s.add_argument("--window", type=int, help="requests in flight (default 8)")
    s.add_argument("--mode", choices=["float", "int8"], default="float")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=cmd_board_sim)


# -- helpers ---------------------------------------------------------------------------------
def _session(args):
    from .host import HostSession
    trace = (lambda line: print(line, file=sys.stderr)) if args.trace else None
    h = HostSession(args.port, args.baud, trace=trace)
    try:
        h.hello()
        if args.set_baud:
            h.set_baud(args.set_baud)
        if args.board and h.info.name != args.board.lower():
            print(f"rwkv-stream: warning: expected board {args.board!r}, the board says "
                  f"{h.info.name!r}", file=sys.stderr)
    except BaseException:
        h.close()
        raise
    return h


def _open(args):
    from host.run_cmd import open_source
    return open_source(args.src, args.quant, args.tensor_type, getattr(args, "imatrix", None),
                       getattr(args, "calib_text", None))


def _precheck(args, source, mode):
    """--board NAME: refuse before opening the port."""
    if not args.board:
        return
    from firmware_sim.link_board import profile
    from formats.quants import by_name

    from .host import StreamFacts, check_fits
    prof = profile(args.board)
    info = P.BoardInfo(P.PROTOCOL_VERSION, P.CAP_LIVE | (P.CAP_INSTALL if prof.flash else 0),
                       prof.max_payload, prof.window, tuple(by_name(t).id for t in prof.types),
                       prof.ram, prof.psram, prof.chunk, prof.flash, 0, 0, 0, 0, prof.name)
    check_fits(StreamFacts(source), info, mode)


def _prompts(args):
    if args.prompt_tokens is not None:
        yield [int(t) for t in args.prompt_tokens.split(",") if t.strip()]
    elif args.prompt is not None:
        yield args.prompt
    else:
        for line in sys.stdin:
            yield line.rstrip("\n")


def _converse(h, args) -> dict:
    from host.tokenizers import StreamingDecoder, get_tokenizer
    tok = None
    results = []
    out = sys.stdout.buffer
    for prompt in _prompts(args):
        if isinstance(prompt, str):
            tok = tok or get_tokenizer(h.n_vocab, args.tokenizer)
            tokens = tok.encode(prompt)
        else:
            tokens = prompt
        if not tokens:
            continue
        generated = h.eval(tokens, args.n)
        text = None
        if tok is not None or h.n_vocab == 256:
            tok = tok or get_tokenizer(h.n_vocab, args.tokenizer)
            dec = StreamingDecoder(tok)
            text = b"".join(dec.push(t) for t in generated)
            if not args.json:
                out.write(text + b"\n")
                out.flush()
        results.append(dict(prompt_tokens=len(tokens), generated=generated,
                            text=None if text is None else text.decode("utf-8", "replace")))
    return dict(board=h.info.name, results=results, link=dict(h.link.stats))


# -- commands ----------------------------------------------------------------------------------
def cmd_install(args):
    from host.progress import progress_bar
    source = _open(args)
    _precheck(args, source, "install")
    with _session(args) as h:
        bar = progress_bar(source.size, f"install -> {h.info.name}")
        state = {"first": True}

        def progress(off, n):
            if state.pop("first", False) and off:
                bar.update(off)             # resuming: what the board already holds
            bar.update(n)
        try:
            result = h.install(source, progress)
        finally:
            bar.close()
        result["link"] = dict(h.link.stats)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"installed {result['size']:,} bytes on {result['board']} (CRC-32 "
              f"{result['crc32']} checked by the board"
              + (f", resumed at byte {result['resumed_from']:,}" if result["resumed_from"] else "")
              + f", {result['seconds']} s)", file=sys.stderr)


def cmd_serve(args):
    source = _open(args)
    _precheck(args, source, "live")
    with _session(args) as h:
        h.live(source)
        result = _converse(h, args)
    if args.json:
        print(json.dumps(result, indent=1))


def cmd_chat(args):
    with _session(args) as h:
        h.run_flash()
        result = _converse(h, args)
    if args.json:
        print(json.dumps(result, indent=1))


def cmd_board_sim(args):
    from firmware_sim.link_board import LinkBoard, profile, serve_url
    types = [t.strip() for t in args.types.split(",")] if args.types else None
    prof = profile(args.board, ram=args.ram, psram=args.psram, flash=args.flash_size,
                   types=types, chunk=args.chunk, max_payload=args.max_frame,
                   window=args.window)
    if prof.max_payload < P.MIN_MAX_PAYLOAD or prof.window > P.MAX_WINDOW:
        raise UsageError(f"--max-frame must be >= {P.MIN_MAX_PAYLOAD} and --window <= "
                         f"{P.MAX_WINDOW}")
    log = (lambda m: print(f"board-sim: {m}", file=sys.stderr)) if args.verbose else None
    board = LinkBoard(prof, flash_path=args.flash, mode=args.mode, live=not args.no_live,
                      log=log)

    def ready(port):
        print(f"board-sim: {prof.name} ready on {args.port}"
              + (f" (listening on port {port})" if port else ""), file=sys.stderr, flush=True)
    try:
        serve_url(board, args.port, args.baud, ready=ready)
    finally:
        board.close()
