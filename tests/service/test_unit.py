"""The shipped systemd unit is valid and starts what the README says."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


from ..conftest import needs

UNIT = Path(__file__).parents[2] / "contrib/systemd/mergefs.service"


@needs("systemd-analyze")
def test_systemd_unit_verifies(tmp_path):
    mergefs = Path(sys.executable).parent / "mergefs"
    text = UNIT.read_text().replace("/usr/local/bin/mergefs", str(mergefs))
    unit = tmp_path / "mergefs.service"
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and "mergefs.service" not in r.stderr, r.stderr
    exec_start = next(l for l in text.splitlines() if l.startswith("ExecStart="))
    argv = exec_start.split("=", 1)[1].split()
    assert argv[1:3] == ["serve", "--root"] and "--socket" in argv
    help_text = subprocess.run([str(mergefs), "serve", "--help"], capture_output=True,
                               text=True).stdout
    for opt in (a for a in argv if a.startswith("--")):
        assert opt in help_text
