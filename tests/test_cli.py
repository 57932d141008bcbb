import subprocess
import sys

import lepton_kernels


def test_lepton_kernels_command_lists_every_op():
    out = subprocess.run([sys.executable, "-m", "lepton", "kernels"], capture_output=True,
                         text=True, check=True).stdout
    for name in lepton_kernels.list_ops():
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert out.count(" eager ") == len(lepton_kernels.list_ops())


def test_unknown_command_exits_with_usage():
    proc = subprocess.run([sys.executable, "-m", "lepton", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
