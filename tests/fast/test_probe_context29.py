"""The oneDNN capability probe answers for the CPU whatever context asks first: its answer is kept for the whole
process, so a probe that failed because of the caller's context turned the fast path off everywhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

CONTEXTS = {
    "default device meta": "with torch.device('meta'):\n    first = fast.fast_path_available(torch.float32)",
    "default dtype float64": "torch.set_default_dtype(torch.float64)\nfirst = fast.fast_path_available(torch.float32)\n"
                             "torch.set_default_dtype(torch.float32)",
    "bf16 autocast": "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
                     "    first = fast.fast_path_available(torch.float32)",
}


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_first_probe_in_a_context_answers_for_the_cpu(context):
    code = (
        "import torch\nfrom pvtv2 import fast\n"
        "if not (torch.backends.mkldnn.is_available()):\n    print('skip'); raise SystemExit\n"
        f"{CONTEXTS[context]}\n"
        "x = torch.randn(1, 3, 32, 32)\n"
        "print(first, fast.fast_path_available(torch.float32))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "skip":
        pytest.skip("no oneDNN in this build")
    # A fresh process without the context says True here (the other fast-path tests hold that).
    assert out.stdout.split() == ["True", "True"], out.stdout
