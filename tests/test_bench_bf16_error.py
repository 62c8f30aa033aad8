"""bench/bf16_error.py: run at a small shape in a subprocess; its table's RBE errors (bfloat16
autocast against float32) are no worse than 2x the dense module's, the issue's bound."""
import os
import re
import subprocess
import sys

from conftest import same_package_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "bf16_error.py")


def test_small_shape_within_twice_dense():
    r = subprocess.run([sys.executable, SCRIPT, "--d-model", "64", "--d-ff", "160", "--block-size", "16",
                        "--k", "60", "--tokens", "100", "--seeds", "2"],
                       capture_output=True, text=True, timeout=300, env=same_package_env())
    assert r.returncode == 0, r.stderr
    rows = {m.group(1): [float(v) for v in m.group(2, 3, 4)]
            for m in re.finditer(r"^\| (rbe|dense) \| (\S+) \| (\S+) \| (\S+) \|$", r.stdout, re.M)}
    assert rows.keys() == {"rbe", "dense"}, r.stdout
    for got, dense in zip(rows["rbe"], rows["dense"]):
        assert 0 < got <= 2 * dense, r.stdout
