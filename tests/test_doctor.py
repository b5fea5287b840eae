"""python -m fastblock.doctor on CPU: the report a user runs first, and its exit status."""
import types

import pytest
import torch

import fastblock
from fastblock import doctor


def test_doctor_reports_and_passes_on_cpu(capsys):
    assert doctor.main(["--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for section in ("== versions", "== backends on cpu", "== correctness", "== speed", "all checks passed"):
        assert section in out, out
    assert "torch " + torch.__version__ in out
    if fastblock.available_backends("cpu")["extension"].available:
        assert "ok   extension" in out and "extension" in out.split("== speed")[1]
    assert "conv+BN+ReLU (floor)" in out and "dynamic conv" in out


def test_doctor_fails_on_a_wrong_backend(capsys):
    ext = fastblock.get_backend("extension")
    if not fastblock.available_backends("cpu")["extension"].available:
        pytest.skip("needs the extension as the backend to wrap")
    real = ext.module()

    def wrong_backward(*args, **kwargs):
        dx, *rest = real.backward(*args, **kwargs)
        return (dx * 2, *rest)

    broken = types.SimpleNamespace(status=real.status, forward=real.forward, backward=wrong_backward)
    fastblock.register_backend(fastblock.Backend(name="broken", devices=("cpu",), auto_devices=(), auto_rank=50,
                                                 load=lambda: broken))
    try:
        assert doctor.main(["--quick", "--device", "cpu"]) == 1
    finally:
        fastblock.unregister_backend("broken")
    out = capsys.readouterr().out
    assert "FAIL broken" in out and "dx" in out and "FAILED" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("argv, message", [(["--device", "cuda"], "argument --device: 'cuda': no CUDA device"),
                                           (["--device", "gpu"], "argument --device: invalid choice: 'gpu'")])
def test_doctor_device_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        doctor.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
