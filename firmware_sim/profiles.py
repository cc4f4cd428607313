"""Board profiles: plain data, one per board, plus user profile files (TOML or JSON).

Link rates are bytes per second a host can push to the board. UART figures are baud/10 (8N1).
USB full speed is 12 Mbit/s raw (~1 MB/s); CDC-ACM on real boards measures ~0.6 MB/s. Flash and
PSRAM read rates are what memory-mapped (XIP) reads sustain, from vendor figures: assumptions,
stated as such by `plan`, not measurements.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from formats.errors import BadInput

KiB, MiB = 1024, 1024 * 1024


@dataclass(frozen=True)
class BoardProfile:
    name: str
    sram: int                      # bytes of internal RAM the firmware can give the model
    flash: int                     # bytes of flash available for an installed stream
    clock_mhz: int
    psram: int = 0                 # external RAM (0: none)
    flash_read: float = 0.0        # bytes/s reading the installed stream from flash (XIP)
    psram_read: float = 0.0        # bytes/s reading from PSRAM
    links: dict = field(default_factory=dict)   # link name -> bytes/s
    notes: str = ""

    def with_overrides(self, ram=None, psram=None, flash=None) -> "BoardProfile":
        return replace(self, sram=self.sram if ram is None else ram,
                       psram=self.psram if psram is None else psram,
                       flash=self.flash if flash is None else flash)

    def as_dict(self) -> dict:
        return asdict(self)


def _uart(baud: int) -> float:
    return baud / 10


USB_FS = 0.6e6          # CDC-ACM at 12 Mbit/s, measured on real boards
USB_HS = 20e6           # CDC-ACM at 480 Mbit/s, a conservative sustained figure

PROFILES: dict[str, BoardProfile] = {p.name: p for p in (
    BoardProfile("rp2040", sram=264 * KiB, flash=2 * MiB, clock_mhz=133,
                 flash_read=20e6, links={"uart-115200": _uart(115200),
                                         "uart-921600": _uart(921600), "usb-fs": USB_FS},
                 notes="flash 2-16 MB depending on the board; --flash to set it"),
    BoardProfile("rp2350", sram=520 * KiB, flash=4 * MiB, clock_mhz=150, psram=0,
                 flash_read=25e6, psram_read=25e6,
                 links={"uart-115200": _uart(115200), "uart-921600": _uart(921600),
                        "usb-fs": USB_FS},
                 notes="PSRAM optional (e.g. 8 MiB on some boards): --psram 8388608"),
    BoardProfile("esp32s3", sram=512 * KiB, flash=8 * MiB, clock_mhz=240, psram=8 * MiB,
                 flash_read=40e6, psram_read=80e6,
                 links={"uart-115200": _uart(115200), "uart-921600": _uart(921600),
                        "usb-fs": USB_FS},
                 notes="8-16 MB flash; octal PSRAM"),
    BoardProfile("stm32h7", sram=1024 * KiB, flash=2 * MiB, clock_mhz=480,
                 flash_read=200e6,
                 links={"uart-921600": _uart(921600), "usb-fs": USB_FS, "usb-hs": USB_HS}),
    BoardProfile("nrf52840", sram=256 * KiB, flash=1 * MiB, clock_mhz=64, flash_read=30e6,
                 links={"uart-115200": _uart(115200), "uart-921600": _uart(921600),
                        "usb-fs": USB_FS}),
)}


def load_profile_file(path) -> BoardProfile:
    path = Path(path)
    try:
        text = path.read_bytes()
        if path.suffix.lower() == ".toml":
            import tomllib
            data = tomllib.loads(text.decode("utf-8"))
        else:
            data = json.loads(text)
    except FileNotFoundError:
        raise BadInput("no such board profile file", path=path) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"not a valid board profile: {e}", path=path) from None
    known = set(BoardProfile.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise BadInput(f"unknown profile fields {sorted(unknown)} (known: {sorted(known)})",
                       path=path)
    missing = {"name", "sram", "flash", "clock_mhz"} - set(data)
    if missing:
        raise BadInput(f"profile lacks {sorted(missing)}", path=path)
    try:
        return BoardProfile(**data)
    except TypeError as e:
        raise BadInput(f"not a valid board profile: {e}", path=path) from None


def get_profile(name_or_path: str) -> BoardProfile:
    key = name_or_path.lower()
    if key in PROFILES:
        return PROFILES[key]
    if Path(name_or_path).suffix.lower() in (".toml", ".json"):
        return load_profile_file(name_or_path)
    raise BadInput(f"unknown board {name_or_path!r} (known: {', '.join(PROFILES)}; or a .toml/"
                   ".json profile file)")
