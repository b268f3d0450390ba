"""Not a test: each way a platform-specific call could get past tests/test_structure.py's platform_calls, once (it
must find them all). Reads /proc/self/maps in this docstring, which is no call."""
import os as _os
import platform
import subprocess
import termios
from os import getloadavg
from pathlib import Path
from signal import SIGKILL

_os.kill(1, SIGKILL)
hasattr(_os, "sched_getaffinity")
subprocess.Popen(["true"], start_new_session=True)
Path("/proc/self/status").read_text(encoding="utf-8")
platform.mac_ver()
getloadavg()
termios.tcgetattr(0)
