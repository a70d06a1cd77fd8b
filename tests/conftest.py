"""Test set-up shared by every test file.

Triton kernels run under the interpreter on CPU: TRITON_INTERPRET must be set before anything imports triton.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
