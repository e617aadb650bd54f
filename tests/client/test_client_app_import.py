"""The ClientApp module imports light: a SuperNode starts a fresh ClientApp process per message, so the
site's heavy modules load inside the handlers, not at import (the time is measured by `make bench`)."""

import subprocess
import sys

HEAVY = ("torch", "monai", "opacus", "SimpleITK", "radiomics", "sklearn", "lifelines", "scipy", "matplotlib")


def test_importing_the_client_app_loads_no_heavy_module():
    probe = ("import sys, hccfed.client.client_app as c; assert c.app is not None; "
             f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"imported at ClientApp import: {done.stdout.strip()}"


def test_the_handlers_still_find_their_modules():
    """What the handlers import lazily exists under those names (an import error would only show on a message)."""
    probe = ("from hccfed.client.federated import train_round, evaluate_round; "
             "from hccfed.client.evaluation import CLINICAL_PREFIX; "
             "from hccfed.client.site import NODE_SITES, site_plan_problems, site_config_path; "
             "import hccfed.client.secagg_client as s; s.SecAggSiteClient.fit")
    subprocess.run([sys.executable, "-c", probe], check=True)
