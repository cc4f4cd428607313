"""pyserial URL handler: `rwkvsim://BOARD[?flash=PATH&mode=float|int8&live=1|0]`.

An in-process simulated board (firmware_sim/link_board.py) at the other end of a loopback TCP
connection, so `--port rwkvsim://esp32s3` needs no second process and no pty. BOARD is a profile
name (firmware_sim/profiles.py) or `sim` (64 MiB, every type). host/link/host.py registers this
package with pyserial before it opens a port.
"""
from __future__ import annotations

import socket
import threading
from urllib.parse import parse_qs, urlparse

from serial import SerialException
from serial.urlhandler.protocol_socket import Serial as _SocketSerial


class Serial(_SocketSerial):
    def open(self):
        from firmware_sim.link_board import LinkBoard, SocketPort, profile
        self.logger = None
        if self.is_open:
            raise SerialException("Port is already open.")
        url = urlparse(self.portstr)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        unknown = set(query) - {"flash", "mode", "live"}
        if unknown:
            raise SerialException(f"rwkvsim:// does not know {sorted(unknown)} (flash, mode, "
                                  "live)")
        try:
            board = LinkBoard(profile(url.netloc or "sim"), flash_path=query.get("flash"),
                              mode=query.get("mode", "float"), live=query.get("live", "1") != "0")
        except Exception as e:                      # an unknown board name, a bad flash path
            raise SerialException(f"rwkvsim:// cannot start the board: {e}") from None
        with socket.create_server(("127.0.0.1", 0)) as server:
            host_end = socket.create_connection(server.getsockname())
            board_end, _ = server.accept()
        self._stop = threading.Event()
        self._board_thread = threading.Thread(target=self._serve, daemon=True,
                                              args=(board, SocketPort(board_end)))
        self._board_thread.start()
        self._socket = host_end
        self._socket.setblocking(False)
        self._reconfigure_port()
        self.is_open = True
        self.reset_input_buffer()
        self.reset_output_buffer()

    def _serve(self, board, port):
        try:
            board.serve(port, self._stop)
        finally:
            port.close()

    def close(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        super().close()
        thread = getattr(self, "_board_thread", None)
        if thread is not None:
            thread.join(timeout=2)
