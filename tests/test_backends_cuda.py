"""``backend="auto"`` on CUDA tensors: Triton until the CUDA kernels have passed the GPU check on the
architecture (``bench/results/cuda_checked.json``), the CUDA kernels after; checked on any machine."""

import json

import torch

from drkl_kernels import backends


def test_unchecked_architectures_are_not_trusted(tmp_path):
    record = tmp_path / "cuda_checked.json"
    assert not backends.cuda_checked((9, 0), record)  # no record
    record.write_text(json.dumps({"sm_90": {"gpu": "NVIDIA H200", "date": "2026-11-29", "commit": "0" * 40,
                                            "passed": True},
                                  "sm_80": {"gpu": "NVIDIA A100", "date": "2026-11-29", "commit": "0" * 40,
                                            "passed": False}}))  # fmt: skip
    assert backends.cuda_checked((9, 0), record)
    assert not backends.cuda_checked((8, 0), record) and not backends.cuda_checked((8, 6), record)
    record.write_text("not json")
    assert not backends.cuda_checked((9, 0), record)


def test_auto_picks_triton_on_cuda_until_checked(monkeypatch, tmp_path):
    """With every backend available, "auto" resolves CUDA tensors to "triton" on an unchecked
    architecture and to "cuda" on a checked one; "cuda" stays available when asked for."""
    record = tmp_path / "cuda_checked.json"
    monkeypatch.setattr(backends, "_why_not", lambda name, device: None)
    monkeypatch.setattr(backends.extension, "load", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(backends, "CUDA_CHECKED", record)
    cuda = torch.device("cuda")
    assert backends.resolve("auto", cuda) == "triton"
    assert backends.resolve("cuda", cuda) == "cuda"
    record.write_text(json.dumps({"sm_90": {"gpu": "NVIDIA H200", "date": "2026-11-29", "commit": "0" * 40,
                                            "passed": True}}))  # fmt: skip
    assert backends.resolve("auto", cuda) == "cuda"
    assert backends.resolve("auto", torch.device("cpu")) == "cpu"
