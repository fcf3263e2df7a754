"""`effai bench`: latency and energy of exported artifacts on the host, Android phones (adb) and Linux boards (ssh).

Imports without torch (only the stdlib and numpy at import time), because it reads nothing but an artifact
directory and its manifest. Entry point: bench.run_bench; contracts: base.py; the standalone on-device timer:
remote_runner.py. This package file imports nothing, so `import effai.device_bench.X` stays light.
"""
