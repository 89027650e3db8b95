"""Test setup: without a GPU the Triton kernels run in the interpreter on the CPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    from tests.helpers import BACKENDS, SEED

    return [f"drkl_kernels: seed {SEED} (set DRKL_TEST_SEED to replay), backends under test {BACKENDS}"]
