"""Measure the firmware on QEMU's mps2-an385 (`make -C firmware measure`, run from anywhere).

* code size: text/data/bss of fw.elf, and the text of each part (link, port, core);
* instructions per token: each tiny fixture (../shared/fixtures or $RWKV_STREAM_FIXTURES) is
  converted to a stream, pre-loaded into the board's storage (-device loader), and `rwkv-stream
  chat` runs a prompt on it under `-icount shift=0`, where QEMU's virtual clock advances 1 ns per
  instruction: the board's own SysTick-based timing of EVAL (logged on UART1) is the number of
  instructions. Tokens/s at 133 and 240 MHz assume one instruction per cycle (an upper bound: a
  Cortex-M3 runs at 1.2-1.5 cycles per instruction, more with flash wait states);
* install throughput: `rwkv-stream install` of a synthetic stream through QEMU's UART model.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
FW = REPO / "firmware"
ELF = FW / "build" / "qemu" / "fw.elf"
FIXTURES = Path(os.environ.get("RWKV_STREAM_FIXTURES", REPO.parent / "shared" / "fixtures"))
MODELS = {"4v0-660K": "tiny-rwkv-4v0-660K-FP16.bin", "5v1-730K": "tiny-rwkv-5v1-730K-FP16.bin",
          "5v2-730K": "tiny-rwkv-5v2-730K-FP16.bin", "6v0-3m": "tiny-rwkv-6v0-3m-Q5_1.bin",
          "7v0-834K": "tiny-rwkv-7v0-834K-FP16.bin"}
ARM_FLAGS = ["-std=c99", "-O2", "-ffp-contract=off", "-mcpu=cortex-m3", "-mthumb",
             "--specs=picolibc.specs",
             "-ffunction-sections", "-fdata-sections", "-DRS_LINK_MAX_PAYLOAD=2048",
             "-DRS_LINK_MAX_WINDOW=8", "-DRS_STATE_SAVE_MAX=262144"]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def sizes() -> dict:
    out = run(["arm-none-eabi-size", str(ELF)]).stdout.splitlines()[1].split()
    total = dict(text=int(out[0]), data=int(out[1]), bss=int(out[2]))
    core = FW / "core"
    inc = ["-I" + str(FW / d) for d in ("link", "port")] + \
        ["-I" + str(core if (core / "rwkv_board.c").exists() else FW / "link" / "stub")]
    parts = {"link": sorted((FW / "link").glob("rs_*.c")) + [FW / "link" / "link_core.c"],
             "port": sorted((FW / "port" / "mps2-an385").glob("*.c")),
             "core": sorted(core.glob("*.c")) if (core / "rwkv_board.c").exists()
             else [FW / "link" / "link_test_stub.c"]}
    by_part = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, srcs in parts.items():
            text = 0
            for src in srcs:
                obj = Path(tmp) / (src.stem + ".o")
                r = run(["arm-none-eabi-gcc", *ARM_FLAGS, *inc, "-c", str(src), "-o", str(obj)])
                if r.returncode:
                    raise SystemExit(r.stderr)
                text += int(run(["arm-none-eabi-size", str(obj)]).stdout.splitlines()[1].split()[0])
            by_part[name] = text
    return dict(total, text_before_gc_by_part=by_part)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def qemu(tmp: Path, preload: bytes | None, icount: bool):
    port = free_port()
    log = tmp / f"uart1-{port}.log"
    cmd = ["qemu-system-arm", "-M", "mps2-an385", "-nographic", "-monitor", "none",
           "-serial", f"tcp:127.0.0.1:{port},server=on,wait=on,nodelay=on",
           "-serial", f"file:{log}", "-kernel", str(ELF)]
    if icount:
        cmd += ["-icount", "shift=0"]
    if preload is not None:
        img = tmp / f"flash-{port}.img"
        img.write_bytes(preload)
        cmd += ["-device", f"loader,file={img},addr=0x21000000,force-raw=on"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"socket://127.0.0.1:{port}", log


def flash_image(data: bytes) -> bytes:
    rec = struct.pack("<4sIQIQ", b"RWKF", 2, len(data), zlib.crc32(data) & 0xFFFFFFFF, len(data))
    rec += (zlib.crc32(rec) & 0xFFFFFFFF).to_bytes(4, "little")
    return rec.ljust(4096, b"\0") + data


def cli(*args, timeout=900):
    r = subprocess.run([sys.executable, "-m", "host.cli", *map(str, args)], capture_output=True,
                       text=True, cwd=REPO, timeout=timeout)
    if r.returncode:
        raise SystemExit(f"rwkv-stream {args[0]} failed: {r.stderr}")
    return r.stdout


def per_token(tmp: Path, stream: Path, prompt: int, n: int) -> dict:
    data = stream.read_bytes()
    proc, url, log = qemu(tmp, flash_image(data), icount=True)
    try:
        t0 = time.perf_counter()
        out = json.loads(cli("chat", "--port", url, "--prompt-tokens",
                             ",".join(str(65 + i % 26) for i in range(prompt)), "-n", n, "--json"))
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(10)
    m = [re.search(r"eval: tokens=(\d+) ns=(\d+)", line) for line in log.read_text().splitlines()]
    tokens, ns = [(int(x.group(1)), int(x.group(2))) for x in m if x][-1]
    return dict(stream_bytes=len(data), tokens=tokens, instructions=ns,
                instructions_per_token=ns // tokens, qemu_wall_s=round(wall, 2),
                generated=out["results"][0]["generated"])


def install_rate(tmp: Path) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from test_firmware_link import synth_stream
    data = synth_stream()
    path = tmp / "synth.rwks"
    path.write_bytes(data)
    proc, url, log = qemu(tmp, None, icount=False)
    try:
        out = json.loads(cli("install", path, "--port", url, "--json"))
    finally:
        proc.terminate()
        proc.wait(10)
    board = re.search(r"install: (\d+) bytes in (\d+) ms", log.read_text())
    return dict(bytes=out["size"], host_seconds=out["seconds"],
                kb_per_s=round(out["size"] / out["seconds"] / 1000, 1),
                board_ms=int(board.group(2)) if board else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="Q8_0,Q4_0")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--prompt", type=int, default=4)
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = run(["make", "-C", str(FW), "-s", "qemu"])
    if r.returncode:
        raise SystemExit(r.stderr)
    result = dict(size=sizes(), models={}, install=None)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        result["install"] = install_rate(tmp)
        for name in filter(None, args.models.split(",")):
            src = FIXTURES / "rwkv_cpp" / MODELS[name]
            if not src.exists():
                print(f"skip {name}: {src} is absent", file=sys.stderr)
                continue
            for quant in args.quant.split(","):
                stream = tmp / f"{name}-{quant}.rwks"
                cli("convert", src, "-o", stream, "--quant", quant)
                m = per_token(tmp, stream, args.prompt, args.n)
                for mhz in (133, 240):
                    m[f"tokens_per_s_at_{mhz}MHz"] = round(
                        mhz * 1e6 / m["instructions_per_token"], 2)
                result["models"][f"{name} {quant}"] = m
                if not args.json:
                    print(f"{name:9} {quant:5} {m['stream_bytes']:>9,} B  "
                          f"{m['instructions_per_token']:>13,} instr/token  "
                          f"{m['tokens_per_s_at_133MHz']:>6} tok/s @133 MHz  "
                          f"{m['tokens_per_s_at_240MHz']:>6} tok/s @240 MHz", flush=True)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        s = result["size"]
        print(f"fw.elf: text {s['text']:,}  data {s['data']:,}  bss {s['bss']:,} bytes "
              f"(text by part before --gc-sections: {s['text_before_gc_by_part']})")
        i = result["install"]
        print(f"install over QEMU's UART: {i['bytes']:,} bytes in {i['host_seconds']} s = "
              f"{i['kb_per_s']} KB/s (board: {i['board_ms']} ms)")


if __name__ == "__main__":
    main()
