"""torchvision, and everything that imports it, imports on this machine's torch once mmn is imported."""

import subprocess
import sys

import pytest


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_libraries_that_import_torchvision_import_after_mmn():
    result = run_python(
        "import mmn, torchvision, transformers, timm, open_clip, lightning\n"
        "from transformers import BeitModel, GPTJForCausalLM\n"
        "import torchvision.transforms.functional as F\n"
        "print('imported', torchvision.__version__)"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "imported" in result.stdout


def test_shim_acts_only_when_the_extension_cannot_load():
    from mmn.compat import torchvision_extension_loads

    result = run_python(
        "import mmn.compat as c, torch\n"
        "print(c._stand_in_library is not None, hasattr(torch.ops.torchvision, 'nms'))"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    defined, has_nms = result.stdout.split()
    # Where the extension loads (CUDA torch) the shim defines nothing; where it cannot
    # (CPU torch with the CUDA torchvision wheel) it defines the schemas torchvision needs.
    assert defined == str(not torchvision_extension_loads())
    assert has_nms == "True"


def test_bare_torchvision_import_fails_here_without_the_shim():
    from mmn.compat import torchvision_extension_loads

    if torchvision_extension_loads():
        pytest.skip("torchvision's extension loads on this torch; there is nothing to work around")
    result = run_python("import torchvision")
    assert result.returncode != 0
    assert "torchvision::nms does not exist" in result.stderr
