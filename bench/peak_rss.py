"""Runs a command and writes its peak resident memory in bytes (getrusage of the child) to a file.

    python bench/peak_rss.py OUT_FILE COMMAND [ARGS...]     exits with the command's code
"""
import resource
import subprocess
import sys
from pathlib import Path

code = subprocess.call(sys.argv[2:])
Path(sys.argv[1]).write_text(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
sys.exit(code)
